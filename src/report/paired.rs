//! Paired comparisons of two methods of a sweep (issue 21, item 3): every method generated the
//! same (subject, test image | classic, caption or prompt, sample) with the same seed (the seed
//! scheme of `crate::eval::store`), so two evaluation folders' results lines with the same key
//! are one *pair*, and the question "does B beat A?" has a paired answer.
//!
//! - [`pair`] joins two result sets by key (same split, same seed) into per-image differences
//!   **B − A** of CLIP-T, CLIP-I and DINO, grouped by subject, and counts the lines without a
//!   partner. For the split-test protocol an *image* is one generated image (test image x
//!   caption x sample); for the classic protocol it is one prompt x sample.
//! - [`bootstrap`] gives the mean paired difference (pooled over generated images, as the
//!   report's tables pool) and a percentile confidence interval from a two-level cluster
//!   bootstrap: resample the subjects with replacement, then within each drawn subject resample
//!   its *images* with replacement, each keeping all of its pairs. An image here is what the
//!   generations share: a held-out test image (split-test: its captions x samples are scored
//!   against it) or a prompt (classic: its samples). Subjects are the outer clusters because
//!   every image of one subject shares its learned weights, and a test image's generations share
//!   its reference and captions; resampling single generations would understate both spreads
//!   (the tests show the coverage it loses).
//!
//! No I/O here: the caller reads the results files. The resampling uses the crate's ChaCha8
//! stream ([`crate::rng::Rng`]) from a fixed seed, so the same data and seed give the same
//! interval. It draws one index per resampled image and sums all three metrics at once from
//! pre-computed differences, so 10,000 resamples of 10,000 pairs take well under a second per
//! (comparison, protocol) in release.

use crate::eval::protocol::Split;
use crate::eval::store::Record;
use crate::rng::Rng;
use std::collections::BTreeMap;

/// The metric names in the order of every `[f64; 3]` here.
pub const METRIC_NAMES: [&str; 3] = ["CLIP-T", "CLIP-I", "DINO"];
/// The metric names as `paired.csv` writes them.
pub const METRIC_KEYS: [&str; 3] = ["clip_t", "clip_i", "dino"];
/// Bootstrap resamples unless told otherwise.
pub const DEFAULT_RESAMPLES: usize = 10_000;
/// The bootstrap seed unless told otherwise.
pub const DEFAULT_SEED: u64 = 0;

/// The per-image differences B − A of one comparison on one protocol.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pairs {
    /// Subject name -> image (test image file, or `prompt N` for classic) -> the differences
    /// `[CLIP-T, CLIP-I, DINO]` of its pairs, in key order.
    pub subjects: BTreeMap<String, BTreeMap<String, Vec<[f64; 3]>>>,
    /// Lines of A with no line of B under the same key.
    pub only_a: usize,
    /// Lines of B with no line of A under the same key.
    pub only_b: usize,
    /// Keys present on both sides whose seeds differ (not a pair: counted apart).
    pub seed_mismatch: usize,
}

impl Pairs {
    /// How many pairs.
    pub fn n_pairs(&self) -> usize {
        self.subjects
            .values()
            .flat_map(|images| images.values())
            .map(Vec::len)
            .sum()
    }

    /// Lines left out for want of a partner (either side, seed mismatches included).
    pub fn unmatched(&self) -> usize {
        self.only_a + self.only_b + 2 * self.seed_mismatch
    }

    /// Add another subject's pairs (from [`pair`] on that subject's two folders).
    pub fn extend(&mut self, other: Pairs) {
        for (s, images) in other.subjects {
            let mine = self.subjects.entry(s).or_default();
            for (image, v) in images {
                mine.entry(image).or_default().extend(v);
            }
        }
        self.only_a += other.only_a;
        self.only_b += other.only_b;
        self.seed_mismatch += other.seed_mismatch;
    }

    /// The subjects' images' pair lists (subjects and images in name order), as [`bootstrap`]
    /// takes them.
    pub fn groups(&self) -> Vec<Group<'_>> {
        self.subjects.values().map(group).collect()
    }
}

/// One subject's pairs, an image's pairs per entry (see the module doc for what an image is).
pub type Group<'a> = Vec<&'a [[f64; 3]]>;

/// A subject's images' pair lists, as [`bootstrap`] and [`pooled_mean`] take them.
pub fn group(images: &BTreeMap<String, Vec<[f64; 3]>>) -> Group<'_> {
    images
        .values()
        .filter(|v| !v.is_empty())
        .map(|v| v.as_slice())
        .collect()
}

/// The image of a results line: what its generation shares with others of its subject (the
/// held-out test image it is scored against; for classic, its prompt).
fn image_of(r: &Record) -> String {
    match &r.test_image {
        Some(t) => t.clone(),
        None => format!("prompt {}", r.caption_index),
    }
}

/// Join the lines of `split` of A and of B by key: one difference B − A per key both have
/// with the same seed. Lines of other splits are ignored; a key seen twice on one side keeps
/// its first line (merged folders hold each key once).
pub fn pair(a: &[Record], b: &[Record], split: Split) -> Pairs {
    fn index(rs: &[Record], split: Split) -> BTreeMap<&str, &Record> {
        let mut m: BTreeMap<&str, &Record> = BTreeMap::new();
        for r in rs.iter().filter(|r| r.split == split) {
            m.entry(r.key.as_str()).or_insert(r);
        }
        m
    }
    let ia = index(a, split);
    let ib = index(b, split);
    let mut out = Pairs::default();
    for (key, ra) in &ia {
        match ib.get(key) {
            None => out.only_a += 1,
            Some(rb) if rb.seed != ra.seed => out.seed_mismatch += 1,
            Some(rb) => out
                .subjects
                .entry(ra.subject.clone())
                .or_default()
                .entry(image_of(ra))
                .or_default()
                .push([
                    rb.clip_t - ra.clip_t,
                    rb.clip_i - ra.clip_i,
                    rb.dino - ra.dino,
                ]),
        }
    }
    out.only_b = ib.keys().filter(|k| !ia.contains_key(*k)).count();
    out
}

/// A mean difference and its confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// The interval lies wholly above or wholly below 0.
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// Mean of every pair of every image of every subject, each metric (NaN without pairs).
pub fn pooled_mean(groups: &[Group<'_>]) -> [f64; 3] {
    let mut sum = [0.0f64; 3];
    let mut n = 0usize;
    for image in groups.iter().flatten() {
        for d in image.iter() {
            for k in 0..3 {
                sum[k] += d[k];
            }
        }
        n += image.len();
    }
    sum.map(|s| s / n as f64)
}

/// The `q` quantile (0..=1) of sorted values, linearly interpolated between order statistics.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    let f = pos - i as f64;
    sorted[i] + (sorted[j] - sorted[i]) * f
}

/// The mean difference of each metric over all pairs and its `level` (e.g. 0.95) percentile
/// interval from `resamples` two-level cluster-bootstrap resamples (subjects, then images
/// within each drawn subject, each image with all its pairs; see the module doc), drawn from
/// the ChaCha8 stream of `seed`. `None` without pairs or with `resamples == 0`. Empty subjects
/// and images are ignored. With one subject the subject level cannot vary and the interval
/// only reflects the images.
pub fn bootstrap(
    groups: &[Group<'_>],
    resamples: usize,
    seed: u64,
    level: f64,
) -> Option<[Interval; 3]> {
    // Each image reduced to its sums and count: a resample adds whole images.
    let groups: Vec<Vec<([f64; 3], usize)>> = groups
        .iter()
        .map(|g| {
            g.iter()
                .filter(|image| !image.is_empty())
                .map(|image| {
                    let mut sum = [0.0f64; 3];
                    for d in image.iter() {
                        for k in 0..3 {
                            sum[k] += d[k];
                        }
                    }
                    (sum, image.len())
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect();
    if groups.is_empty() || resamples == 0 {
        return None;
    }
    let mean = {
        let (mut sum, mut n) = ([0.0f64; 3], 0usize);
        for (s, c) in groups.iter().flatten() {
            for k in 0..3 {
                sum[k] += s[k];
            }
            n += c;
        }
        sum.map(|s| s / n as f64)
    };
    let mut rng = Rng::new(seed);
    let s = groups.len();
    let mut means: [Vec<f64>; 3] = std::array::from_fn(|_| Vec::with_capacity(resamples));
    for _ in 0..resamples {
        let mut sum = [0.0f64; 3];
        let mut n = 0usize;
        for _ in 0..s {
            let g = &groups[rng.range(0, s)];
            for _ in 0..g.len() {
                let (d, c) = &g[rng.range(0, g.len())];
                sum[0] += d[0];
                sum[1] += d[1];
                sum[2] += d[2];
                n += c;
            }
        }
        for k in 0..3 {
            means[k].push(sum[k] / n as f64);
        }
    }
    let tail = (1.0 - level) / 2.0;
    Some(std::array::from_fn(|k| {
        let v = &mut means[k];
        v.sort_by(f64::total_cmp);
        Interval {
            mean: mean[k],
            lo: quantile(v, tail),
            hi: quantile(v, 1.0 - tail),
        }
    }))
}

/// The bootstrap seed of one (comparison, protocol): derived from the user's seed and the
/// comparison's label, so adding a `--compare` leaves every other row's interval unchanged.
pub fn job_seed(seed: u64, label: &str, split: Split) -> u64 {
    Rng::derive_seed(&[&seed.to_string(), label, split.as_str()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic pairs: `subjects` subjects of `images` images of `per` generations each; a
    /// subject's mean difference is `truth + subject effect` (sd `between`), an image adds its
    /// own effect (sd `image_sd`), a generation adds noise (sd `within`); the three metrics are
    /// offset copies so each has its own true difference.
    struct Synthetic {
        subjects: usize,
        images: usize,
        per: usize,
        truth: f64,
        between: f64,
        image_sd: f64,
        within: f64,
    }

    type Sweep = Vec<Vec<Vec<[f64; 3]>>>;

    fn normal(rng: &mut Rng) -> f64 {
        // Box-Muller from two uniforms of the seeded stream.
        let u1 = (rng.uniform_f32() as f64).max(1e-12);
        let u2 = rng.uniform_f32() as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    impl Synthetic {
        fn draw(&self, rng: &mut Rng) -> Sweep {
            (0..self.subjects)
                .map(|_| {
                    let subject = self.truth + self.between * normal(rng);
                    (0..self.images)
                        .map(|_| {
                            let image = subject + self.image_sd * normal(rng);
                            (0..self.per)
                                .map(|_| {
                                    let d = image + self.within * normal(rng);
                                    [d, d + 0.1, d - 0.2]
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        }
    }

    fn refs(g: &Sweep) -> Vec<Group<'_>> {
        g.iter()
            .map(|s| s.iter().map(|v| v.as_slice()).collect())
            .collect()
    }

    /// Over 200 seeded synthetic sweeps with a known difference, the 95 % interval covers the
    /// truth about 95 % of the time; resampling generations alone (ignoring the subject and
    /// image levels) covers it far less often with these between-subject and between-image
    /// differences.
    #[test]
    fn interval_covers_the_true_difference() {
        let truth = 0.03;
        let setup = Synthetic {
            subjects: 20,
            images: 4,
            per: 5,
            truth,
            between: 0.03,
            image_sd: 0.03,
            within: 0.05,
        };
        let mut rng = Rng::new(11);
        let mut covered = [0usize; 3];
        let mut naive_covered = 0usize;
        let trials = 200;
        for t in 0..trials {
            let g = setup.draw(&mut rng);
            let ci = bootstrap(&refs(&g), 400, t as u64, 0.95).unwrap();
            for k in 0..3 {
                let want = truth + [0.0, 0.1, -0.2][k];
                if ci[k].lo <= want && want <= ci[k].hi {
                    covered[k] += 1;
                }
            }
            // Every generation its own image of one subject: a generation-level bootstrap.
            let flat: Vec<&[[f64; 3]]> = g
                .iter()
                .flatten()
                .flatten()
                .map(std::slice::from_ref)
                .collect();
            let naive = bootstrap(&[flat], 400, t as u64, 0.95).unwrap();
            if naive[0].lo <= truth && truth <= naive[0].hi {
                naive_covered += 1;
            }
        }
        for c in covered {
            let rate = c as f64 / trials as f64;
            assert!((0.89..=0.99).contains(&rate), "coverage {rate}");
        }
        let naive = naive_covered as f64 / trials as f64;
        assert!(naive < 0.8, "generation-level coverage {naive}");
    }

    /// One fixed dataset: the interval holds the truth and the pooled mean, is reproducible
    /// from its seed, and narrows as subjects and images grow.
    #[test]
    fn interval_is_seeded_and_shrinks_with_n() {
        let mut rng = Rng::new(5);
        let setup = |subjects, images| Synthetic {
            subjects,
            images,
            per: 5,
            truth: 0.02,
            between: 0.01,
            image_sd: 0.01,
            within: 0.05,
        };
        let small = setup(5, 2).draw(&mut rng);
        let big = setup(40, 8).draw(&mut rng);
        let a = bootstrap(&refs(&small), 2000, 1, 0.95).unwrap();
        let b = bootstrap(&refs(&small), 2000, 1, 0.95).unwrap();
        assert_eq!(a, b);
        let c = bootstrap(&refs(&small), 2000, 2, 0.95).unwrap();
        assert_ne!(a[0].lo, c[0].lo, "another seed, other resamples");
        let large = bootstrap(&refs(&big), 2000, 1, 0.95).unwrap();
        for k in 0..3 {
            let want = 0.02 + [0.0, 0.1, -0.2][k];
            for ci in [a[k], large[k]] {
                assert!(ci.lo <= ci.mean && ci.mean <= ci.hi, "{ci:?}");
                assert!(ci.lo <= want && want <= ci.hi, "{ci:?} vs {want}");
            }
            let (w_small, w_large) = (a[k].hi - a[k].lo, large[k].hi - large[k].lo);
            // 8x the subjects: about sqrt(8) = 2.8x narrower.
            assert!(w_large < w_small / 2.0, "{w_large} vs {w_small}");
        }
        assert!(large[0].excludes_zero());
        assert!(bootstrap(&[], 100, 0, 0.95).is_none());
        assert!(bootstrap(&refs(&small), 0, 0, 0.95).is_none());
    }

    /// The mean is pooled over generations (a subject or image with more weighs more); with
    /// every difference equal the interval collapses onto it.
    #[test]
    fn pooled_mean_and_constant_differences() {
        let g: Sweep = vec![
            vec![vec![[1.0, 0.0, 0.0]; 2], vec![[1.0, 0.0, 0.0]; 1]],
            vec![vec![[0.0, 0.0, 1.0]; 1]],
        ];
        assert_eq!(pooled_mean(&refs(&g)), [0.75, 0.0, 0.25]);
        let ci = bootstrap(&refs(&g), 50, 3, 0.95).unwrap();
        assert_eq!(ci.map(|c| c.mean), [0.75, 0.0, 0.25]);
        let same: Sweep = vec![
            vec![vec![[0.5, -0.5, 0.0]; 4]],
            vec![vec![[0.5, -0.5, 0.0]; 2], vec![[0.5, -0.5, 0.0]; 3]],
        ];
        let ci = bootstrap(&refs(&same), 50, 3, 0.95).unwrap();
        for (k, want) in [0.5, -0.5, 0.0].into_iter().enumerate() {
            assert!((ci[k].mean - want).abs() < 1e-12);
            assert!((ci[k].lo - want).abs() < 1e-12 && (ci[k].hi - want).abs() < 1e-12);
        }
        assert!(!ci[2].excludes_zero());
        let sorted = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&sorted, 0.5), 2.0);
        assert_eq!(quantile(&sorted, 0.125), 0.5);
        assert_eq!(quantile(&sorted, 1.0), 4.0);
    }

    fn rec(subject: &str, split: Split, key: &str, seed: u64, v: f64) -> Record {
        Record {
            key: format!("{subject}/{}/{key}", split.as_str()),
            subject: subject.into(),
            split,
            // `<test image | classic>/<caption or prompt>/<sample>`, as the store's keys.
            test_image: (split == Split::Test).then(|| key.split('/').next().unwrap().into()),
            caption_index: key.split('/').nth(1).unwrap().parse().unwrap(),
            sample: key.split('/').nth(2).unwrap().parse().unwrap(),
            seed,
            prompt: "a photo of {}".into(),
            clip_t_text: "a photo of dog".into(),
            clip_t: v,
            clip_i: 2.0 * v,
            dino: 3.0 * v,
            image: String::new(),
        }
    }

    /// Pairs are joined by key and seed within one split; lines without a partner and seed
    /// mismatches are counted, not paired.
    #[test]
    fn pairs_by_key_and_seed() {
        let a = vec![
            rec("dog", Split::Test, "01.jpg/0/0", 1, 0.1),
            rec("dog", Split::Test, "01.jpg/0/1", 2, 0.2),
            rec("dog", Split::Test, "02.jpg/0/0", 3, 0.3),
            rec("dog", Split::Test, "03.jpg/0/0", 4, 0.3),
            rec("dog", Split::Train, "classic/0/0", 5, 0.4),
        ];
        let b = vec![
            rec("dog", Split::Test, "01.jpg/0/1", 2, 0.5),
            rec("dog", Split::Test, "01.jpg/0/0", 1, 0.1),
            rec("dog", Split::Test, "03.jpg/0/0", 9, 0.3),
            rec("dog", Split::Test, "04.jpg/0/0", 6, 0.3),
            rec("dog", Split::Train, "classic/0/0", 5, 0.0),
        ];
        let p = pair(&a, &b, Split::Test);
        assert_eq!(p.n_pairs(), 2);
        assert_eq!((p.only_a, p.only_b, p.seed_mismatch), (1, 1, 1));
        assert_eq!(p.unmatched(), 4);
        // Both pairs belong to test image 01.jpg; key order 01.jpg/0/0 then 01.jpg/0/1; B − A.
        assert_eq!(p.subjects["dog"].len(), 1);
        let d = &p.subjects["dog"]["01.jpg"];
        assert_eq!(d[0], [0.0, 0.0, 0.0]);
        assert!((d[1][0] - 0.3).abs() < 1e-12 && (d[1][2] - 0.9).abs() < 1e-12);
        let c = pair(&a, &b, Split::Train);
        assert_eq!(c.n_pairs(), 1);
        assert!((c.subjects["dog"]["prompt 0"][0][1] + 0.8).abs() < 1e-12);
        let mut all = p.clone();
        all.extend(pair(
            &[rec("cat", Split::Test, "x/0/0", 1, 0.0)],
            &[rec("cat", Split::Test, "x/0/0", 1, 1.0)],
            Split::Test,
        ));
        assert_eq!(all.n_pairs(), 3);
        assert_eq!(all.groups().len(), 2);
    }
}
