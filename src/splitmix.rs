//! splitmix64's finaliser: the one hash behind dropout's masks, the per-step seeds and the
//! kernels' self-check inputs. A leaf.

/// splitmix64: seeds for the dropout calls of one step, layer and projection (and their masks).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
