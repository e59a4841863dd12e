//! How far a single-label classifier's probabilities can be taken at their word, and one
//! temperature that makes them more so (Guo et al. 2017, "On Calibration of Modern Neural
//! Networks"): NLL, the Brier score and the top-label expected calibration error over 15
//! equal-width bins, from logits; the temperature `T` minimising the NLL of `softmax(z / T)`.
//! `T` changes no prediction (the argmax of `z / T` is the argmax of `z`), only the confidence.
use anyhow::{ensure, Result};

/// Guo et al.'s bin count.
pub const ECE_BINS: usize = 15;

/// The file beside an adapter holding its temperature.
pub const FILE: &str = "calibration.json";

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    /// Mean −ln p(gold): scikit-learn's `log_loss`.
    pub nll: f64,
    /// scikit-learn's `brier_score_loss`: mean (p₁ − y)² for two classes, mean Σ_c (p_c − 1[c = y])²
    /// for more (its `scale_by_half="auto"`).
    pub brier: f64,
    /// Σ_b |B_b|/n · |accuracy(B_b) − mean confidence(B_b)|, the top label's probability
    /// binned into (k/15, (k+1)/15].
    pub ece: f64,
}

/// One bin of the reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean top-label probability and the fraction predicted right (0 for an empty bin).
    pub confidence: f64,
    pub accuracy: f64,
}

/// Row-wise log-softmax of `z / t`.
fn log_softmax(row: &[f64], t: f64) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v / t));
    let lse = m + row.iter().map(|&v| (v / t - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v / t - lse).collect()
}

fn check(logits: &[Vec<f64>], gold: &[i64]) -> Result<()> {
    ensure!(!logits.is_empty(), "no examples to calibrate on");
    ensure!(
        logits.len() == gold.len(),
        "{} logit rows for {} labels",
        logits.len(),
        gold.len()
    );
    for (row, &y) in logits.iter().zip(gold) {
        ensure!(
            y >= 0 && (y as usize) < row.len(),
            "label {y} outside the {} classes",
            row.len()
        );
        ensure!(row.iter().all(|v| v.is_finite()), "a non-finite logit");
    }
    Ok(())
}

/// NLL, Brier and ECE of `softmax(logits)` against the gold class ids.
pub fn measure(logits: &[Vec<f64>], gold: &[i64]) -> Result<Calibration> {
    check(logits, gold)?;
    let n = logits.len() as f64;
    let (mut nll, mut brier) = (0.0, 0.0);
    for (row, &y) in logits.iter().zip(gold) {
        let lp = log_softmax(row, 1.0);
        nll -= lp[y as usize];
        brier += if row.len() == 2 {
            (lp[1].exp() - (y == 1) as i64 as f64).powi(2)
        } else {
            lp.iter()
                .enumerate()
                .map(|(c, l)| (l.exp() - (c as i64 == y) as i64 as f64).powi(2))
                .sum::<f64>()
        };
    }
    let ece = reliability(logits, gold)?
        .iter()
        .map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs())
        .sum();
    Ok(Calibration {
        nll: nll / n,
        brier: brier / n,
        ece,
    })
}

/// The reliability diagram's bins: each example's top-label probability in the bin
/// (k/15, (k+1)/15] (a probability of exactly 0 in the first), its correctness counted there.
pub fn reliability(logits: &[Vec<f64>], gold: &[i64]) -> Result<Vec<Bin>> {
    check(logits, gold)?;
    let mut sums = vec![(0usize, 0.0f64, 0usize); ECE_BINS];
    for (row, &y) in logits.iter().zip(gold) {
        let lp = log_softmax(row, 1.0);
        // The class the default decision predicts (the first among equal maxima).
        let top = crate::threshold::argmax(&lp);
        let p = lp[top].exp();
        let k = ((p * ECE_BINS as f64).ceil() as usize).clamp(1, ECE_BINS) - 1;
        sums[k].0 += 1;
        sums[k].1 += p;
        sums[k].2 += usize::from(top as i64 == y);
    }
    Ok(sums
        .iter()
        .enumerate()
        .map(|(k, &(count, conf, right))| Bin {
            lower: k as f64 / ECE_BINS as f64,
            upper: (k + 1) as f64 / ECE_BINS as f64,
            count,
            confidence: if count > 0 { conf / count as f64 } else { 0.0 },
            accuracy: if count > 0 {
                right as f64 / count as f64
            } else {
                0.0
            },
        })
        .collect())
}

/// The temperature minimising the mean NLL of `softmax(logits / T)`. The NLL is convex in
/// β = 1/T (its second derivative is the mean variance of z under softmax(βz)), so the
/// zero of its derivative `mean(E_β[z] − z_gold)` is found by bisection on ln β, to the
/// last bits, within T ∈ [1/1000, 1000] (a split the model separates perfectly has its
/// minimum at T → 0 and gets the bound).
pub fn fit_temperature(logits: &[Vec<f64>], gold: &[i64]) -> Result<f64> {
    check(logits, gold)?;
    let slope = |beta: f64| -> f64 {
        let mut d = 0.0;
        for (row, &y) in logits.iter().zip(gold) {
            let lp = log_softmax(row, 1.0 / beta);
            let mean_z: f64 = lp.iter().zip(row).map(|(l, z)| l.exp() * z).sum();
            d += mean_z - row[y as usize];
        }
        d / logits.len() as f64
    };
    let (mut lo, mut hi) = (1e-3f64.ln(), 1e3f64.ln());
    if slope(lo.exp()) >= 0.0 {
        return Ok(1.0 / lo.exp());
    }
    if slope(hi.exp()) <= 0.0 {
        return Ok(1.0 / hi.exp());
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if slope(mid.exp()) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-15 {
            break;
        }
    }
    Ok(1.0 / (0.5 * (lo + hi)).exp())
}

/// softmax(`logits / t`), row by row.
pub fn probabilities(logits: &[Vec<f64>], t: f64) -> Vec<Vec<f64>> {
    logits
        .iter()
        .map(|r| log_softmax(r, t).into_iter().map(f64::exp).collect())
        .collect()
}

/// `logits / t`, row by row.
pub fn scaled(logits: &[Vec<f64>], t: f64) -> Vec<Vec<f64>> {
    logits
        .iter()
        .map(|r| r.iter().map(|v| v / t).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_measures_by_hand() {
        // p1 = σ(z1 − z0): 0.8, 0.3, 0.6 with gold 1, 0, 0.
        let l = |p: f64| vec![0.0, (p / (1.0 - p)).ln()];
        let logits = vec![l(0.8), l(0.3), l(0.6)];
        let c = measure(&logits, &[1, 0, 0]).unwrap();
        let nll = -(0.8f64.ln() + 0.7f64.ln() + 0.4f64.ln()) / 3.0;
        assert!((c.nll - nll).abs() < 1e-12);
        let brier = (0.2f64.powi(2) + 0.3f64.powi(2) + 0.6f64.powi(2)) / 3.0;
        assert!((c.brier - brier).abs() < 1e-12);
        // Top labels: 0.8 right (bin 12), 0.7 right (bin 10: (0.667, 0.733]), 0.6 wrong (bin 8).
        let ece = (0.2 + 0.3 + 0.6) / 3.0;
        assert!((c.ece - ece).abs() < 1e-12, "{}", c.ece);
    }

    #[test]
    fn the_fitted_temperature_is_the_nll_minimum() {
        // Over-confident logits: right 70% of the time at ~95% confidence.
        let mut logits = Vec::new();
        let mut gold = Vec::new();
        for i in 0..100 {
            let y = i % 3;
            let pred = if i % 10 < 7 { y } else { (y + 1) % 3 };
            let mut row = vec![0.0; 3];
            row[pred as usize] = 3.5 + 0.01 * i as f64;
            logits.push(row);
            gold.push(y);
        }
        let t = fit_temperature(&logits, &gold).unwrap();
        assert!(t > 1.0, "over-confident: T {t}");
        let nll = |t: f64| measure(&scaled(&logits, t), &gold).unwrap().nll;
        for dt in [1e-3, -1e-3, 0.1, -0.1] {
            assert!(nll(t) <= nll(t + dt), "T {t} vs {}", t + dt);
        }
        assert!(nll(t) < nll(1.0));
        assert!(
            measure(&scaled(&logits, t), &gold).unwrap().ece < measure(&logits, &gold).unwrap().ece
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(measure(&[], &[]).is_err());
        assert!(measure(&[vec![0.0, 1.0]], &[2]).is_err());
        assert!(fit_temperature(&[vec![f64::NAN, 1.0]], &[0]).is_err());
    }
}
