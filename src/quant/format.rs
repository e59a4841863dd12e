//! The NF4 format, as bitsandbytes 0.50.2 lays it out: the flattened weight is cut into
//! blocks of `blocksize` elements, each scaled by its absolute maximum; element `i` is a 4-bit
//! index into [`NF4_CODE`] stored in byte `i / 2`, in the high nibble when `i` is even. With
//! double quantization the per-block absmax is itself stored as 8-bit codes of
//! `absmax - mean(absmax)` in blocks of 256 (dynamic map [`DYNAMIC_MAP`]). The types and the
//! layout checks every implementation relies on; no kernel here.
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

const fn table<const N: usize>(bits: [u32; N]) -> [f32; N] {
    let mut out = [0.0f32; N];
    let mut i = 0;
    while i < N {
        out[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    out
}

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`), as the exact f32 values torch holds.
pub const NF4_CODE: [f32; 16] = table([
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
]);

/// bitsandbytes' `create_dynamic_map(signed=True)`: the 8-bit code of the nested absmax.
/// Sorted ascending (the quantizer relies on it).
pub const DYNAMIC_MAP: [f32; 256] = table([
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
]);

/// Block size bitsandbytes uses for the nested (double-quantized) absmax.
pub const NESTED_BLOCKSIZE: i64 = 256;

/// Block sizes bitsandbytes' `quantize_4bit` accepts.
pub const BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nf4Options {
    /// Elements per absmax block; one of [`BLOCKSIZES`].
    pub blocksize: i64,
    /// Quantize the absmax too (bitsandbytes' `compress_statistics=True`).
    pub double_quant: bool,
}

impl Default for Nf4Options {
    fn default() -> Self {
        Nf4Options {
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// The per-block scales of an [`Nf4Tensor`].
#[derive(Debug)]
pub enum Absmax {
    /// f32 `[n_blocks]`.
    Plain(Tensor),
    /// Double quantization: scale of block `b` is
    /// `nested_code[quant[b]] * nested_absmax[b / nested_blocksize] + offset` (two f32 roundings).
    Nested {
        /// u8 `[n_blocks]`.
        quant: Tensor,
        offset: f32,
        /// f32 `[ceil(n_blocks / nested_blocksize)]`.
        nested_absmax: Tensor,
        /// f32 `[256]`.
        nested_code: Tensor,
        nested_blocksize: i64,
    },
}

/// A weight quantized to NF4.
#[derive(Debug)]
pub struct Nf4Tensor {
    /// u8 `[(numel + 1) / 2, 1]`, as bitsandbytes stores it.
    pub packed: Tensor,
    pub absmax: Absmax,
    /// Shape of the original weight.
    pub shape: Vec<i64>,
    /// Kind of the original weight.
    pub dtype: Kind,
    pub blocksize: i64,
}

pub(crate) fn check_blocksize(blocksize: i64) -> Result<()> {
    ensure!(
        BLOCKSIZES.contains(&blocksize),
        "unsupported NF4 blocksize {blocksize}; bitsandbytes accepts {BLOCKSIZES:?}"
    );
    Ok(())
}

pub(crate) fn div_ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Checks that `t` can be handed to a kernel as a buffer of `numel` elements of `kind`.
pub(crate) fn expect_buffer(
    t: &Tensor,
    kind: Kind,
    numel: i64,
    device: Device,
    what: &str,
) -> Result<()> {
    ensure!(
        t.kind() == kind,
        "{what}: expected {kind:?}, got {:?}",
        t.kind()
    );
    ensure!(
        t.numel() as i64 == numel,
        "{what}: expected {numel} elements, got {} (shape {:?})",
        t.numel(),
        t.size()
    );
    ensure!(
        t.device() == device,
        "{what}: on {:?}, expected {device:?}",
        t.device()
    );
    ensure!(t.is_contiguous(), "{what}: not contiguous");
    Ok(())
}

impl Nf4Tensor {
    pub fn device(&self) -> Device {
        self.packed.device()
    }

    /// A copy on `d` (tensors already there are shared, not copied).
    pub fn to_device(&self, d: Device) -> Nf4Tensor {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => Absmax::Plain(a.to_device(d)),
            Absmax::Nested {
                quant,
                offset,
                nested_absmax,
                nested_code,
                nested_blocksize,
            } => Absmax::Nested {
                quant: quant.to_device(d),
                offset: *offset,
                nested_absmax: nested_absmax.to_device(d),
                nested_code: nested_code.to_device(d),
                nested_blocksize: *nested_blocksize,
            },
        };
        Nf4Tensor {
            packed: self.packed.to_device(d),
            absmax,
            shape: self.shape.clone(),
            dtype: self.dtype,
            blocksize: self.blocksize,
        }
    }

    /// Bytes held by the packed weight and its scales.
    pub fn nbytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        bytes(&self.packed)
            + match &self.absmax {
                Absmax::Plain(a) => bytes(a),
                Absmax::Nested {
                    quant,
                    nested_absmax,
                    nested_code,
                    ..
                } => bytes(quant) + bytes(nested_absmax) + bytes(nested_code),
            }
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    pub fn n_blocks(&self) -> i64 {
        div_ceil(self.numel(), self.blocksize)
    }

    /// The shape and packed-buffer invariants every implementation relies on.
    pub(crate) fn validate_layout(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = self.numel();
        ensure!(
            n > 0 && self.shape.iter().all(|&d| d >= 0),
            "NF4 weight has an invalid shape {:?}",
            self.shape
        );
        let device = self.device();
        expect_buffer(
            &self.packed,
            Kind::Uint8,
            (n + 1) / 2,
            device,
            "NF4 packed weight",
        )?;
        Ok(())
    }
}
