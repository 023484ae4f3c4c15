//! Simulated single-cell multi-omics with ground truth, streamed to an AnnData or MuData store.
//!
//! Generative model (all seeded; a block of cells depends only on (seed, block index), so the
//! output does not depend on thread count):
//! - cell types k = 1..K have centres m_k ~ N(0, 2^2 I) in a d-dimensional latent space; a cell
//!   of type k has latent z = m_k + N(0, 0.5^2 I), written to `obsm/X_true_latent`.
//! - RNA (G genes): gene baseline b_g ~ N(0, 1.2^2), loadings W_g ~ N(0, 0.5^2 I/d'),
//!   batch effect (multiplicative) beta_bg ~ N(0, 0.3^2) on the log scale. Expression
//!   rho = softmax_g(b_g + W_g z + beta_bg); library size L ~ LogNormal(log(library), 0.5)
//!   times a per-batch depth factor (additive on the log scale); ambient background a_b * mean
//!   profile added (additive batch effect). Counts ~ NB(mean mu, inverse dispersion theta_g)
//!   as Poisson-Gamma, then zero-inflated with per-gene dropout pi_g ~ U(0, 0.2).
//! - protein (P, ADT-like): counts ~ NB(background_bp + foreground_p(z)), theta = 10, with a
//!   per-batch background (totalVI's background/foreground mixture).
//! - ATAC-like (R peaks): binary accessibility ~ Bernoulli(sigmoid(c_r + U_r z + depth_c + batch)).
//! - each non-RNA modality is missing for a `missing` fraction of cells and in every cell of
//!   the `missing_batches` (MuData obsmap = 0). A missing cell's counts are drawn all the same
//!   and dropped, so a store with missing cells holds exactly the measured cells of the store
//!   simulated without (same seed and sizes): the ground truth of imputation.
//!
//! The hard scenario ([`Scenario::Hard`], `SimConfig::hard`) adds what makes real atlases hard
//! to integrate: types are lineages of [`SUBTYPES`] weakly separated subtypes (subtype centre =
//! lineage centre + N(0, 0.5^2 I)), batches of unequal size (weights B, B-1, ..., 1) and
//! composition (random type weights; the last batch lacks two types, the last type lives in
//! batch 0 only), stronger gene-wise batch effects plus batch x lineage interactions
//! (N(0, 0.3^2) each), and library depths spread over 1.8x between batches. Cells are stored
//! grouped by batch, as a concatenation of batches is. The lineage is written to `obs/lineage`.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma, LogNormal, Normal, Poisson};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::dataframe::Column;
use crate::error::{DataError, Result};
use crate::matrix::Csr;
use crate::store::ZarrVersion;
use crate::write::{Elem, ModalityLayout, StoreWriter};

/// What to simulate. Defaults: 10,000 cells, 2,000 genes, 8 types, 3 batches, RNA only.
#[derive(Debug, Clone, Serialize)]
pub struct SimConfig {
    pub n_cells: u64,
    pub n_genes: usize,
    pub n_proteins: usize,
    pub n_peaks: usize,
    pub n_types: usize,
    pub n_batches: usize,
    pub latent_dim: usize,
    /// Median RNA library size (total UMIs per cell).
    pub library: f64,
    /// Fraction of cells missing each non-RNA modality.
    pub missing: f64,
    /// Batches in which every cell misses each non-RNA modality (totalVI's case: a batch
    /// without CITE-seq).
    pub missing_batches: Vec<usize>,
    /// Draw cells from these of the `n_batches` batches only (the batch column then lists just
    /// them): stores simulated with one seed and disjoint lists share cell types, genes and batch
    /// effects, so one can serve as a reference and the other as a query with new batches.
    pub only_batches: Option<Vec<usize>>,
    pub scenario: Scenario,
    pub seed: u64,
    pub version: ZarrVersion,
}

/// The structure of the simulated population (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Balanced batches with every type, well-separated types, gene-wise batch effects.
    #[default]
    Standard,
    /// Lineages of weakly separated subtypes, unbalanced batches and compositions, batch x
    /// lineage interactions, batch-dependent depth.
    Hard,
}

/// Subtypes per lineage in the hard scenario.
pub const SUBTYPES: usize = 3;

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            n_cells: 10_000,
            n_genes: 2_000,
            n_proteins: 0,
            n_peaks: 0,
            n_types: 8,
            n_batches: 3,
            latent_dim: 10,
            library: 1_500.0,
            missing: 0.0,
            missing_batches: Vec::new(),
            only_batches: None,
            scenario: Scenario::Standard,
            seed: 0,
            version: ZarrVersion::V3,
        }
    }
}

impl SimConfig {
    /// The hard scenario at its benchmark size: 12 types (4 lineages x 3 subtypes), 4 batches,
    /// ~600 non-zeros per cell of 2,000 genes.
    pub fn hard() -> SimConfig {
        SimConfig {
            n_types: 12,
            n_batches: 4,
            library: 6_000.0,
            scenario: Scenario::Hard,
            ..SimConfig::default()
        }
    }
}

/// What was written, for the CLI summary.
#[derive(Debug, Clone, Serialize)]
pub struct SimSummary {
    pub n_cells: u64,
    pub modalities: Vec<(String, u64, u64)>,
    pub mudata: bool,
}

const BLOCK: u64 = 4096;

/// Parameters shared by all cells, drawn from the seed.
struct World {
    centres: Vec<Vec<f64>>,
    gene_base: Vec<f64>,
    gene_load: Vec<Vec<f64>>,
    gene_batch: Vec<Vec<f64>>,
    gene_theta: Vec<f64>,
    gene_dropout: Vec<f64>,
    ambient: Vec<f64>,
    batch_depth: Vec<f64>,
    batch_ambient: Vec<f64>,
    prot_load: Vec<Vec<f64>>,
    prot_background: Vec<Vec<f64>>,
    peak_base: Vec<f64>,
    peak_load: Vec<Vec<f64>>,
    peak_batch: Vec<f64>,
    hard: Option<Hard>,
}

/// The hard scenario's extra structure, drawn after the standard world so the standard
/// scenario's draws are unchanged.
struct Hard {
    /// The batches in store order (`only_batches` when given) and the cell each one ends at.
    batches: Vec<(usize, u64)>,
    /// Per batch, cumulative type weights.
    type_cdf: Vec<Vec<f64>>,
    /// [batch][lineage][gene] log-scale interaction.
    interaction: Vec<Vec<Vec<f64>>>,
}

fn cumulative(weights: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut total = 0.0;
    weights
        .map(|w| {
            total += w;
            total
        })
        .collect()
}

/// Index i with cdf[i-1] <= u·total < cdf[i] (zero weights are never drawn).
fn pick(rng: &mut Xoshiro256PlusPlus, cdf: &[f64]) -> usize {
    let u = rng.random::<f64>() * cdf.last().copied().unwrap_or(0.0);
    cdf.iter().position(|&c| u < c).unwrap_or(cdf.len() - 1)
}

impl Hard {
    fn new(c: &SimConfig, rng: &mut Xoshiro256PlusPlus, w: &mut World) -> Hard {
        let (k, nb) = (c.n_types, c.n_batches);
        for lineage in 0..k / SUBTYPES {
            let centre = w.centres[lineage * SUBTYPES].clone();
            for t in lineage * SUBTYPES..(lineage + 1) * SUBTYPES {
                w.centres[t] = centre.iter().map(|m| m + normal(rng, 0.5)).collect();
            }
        }
        for (b, effect) in w.gene_batch.iter_mut().enumerate() {
            effect.iter_mut().for_each(|e| *e += normal(rng, 0.3));
            w.batch_depth[b] += 0.6 * (b as f64 / (nb - 1) as f64 - 0.5);
        }
        let interaction = (0..nb)
            .map(|_| {
                (0..k / SUBTYPES)
                    .map(|_| vecn(rng, c.n_genes, 0.3))
                    .collect()
            })
            .collect();
        let type_cdf = (0..nb)
            .map(|b| {
                let weights: Vec<f64> = (0..k).map(|_| rng.random_range(0.5..1.5)).collect();
                cumulative(weights.into_iter().enumerate().map(|(t, w)| {
                    let absent =
                        (b == nb - 1 && (t == 1 || t == SUBTYPES + 1)) || (b > 0 && t == k - 1);
                    if absent { 0.0 } else { w }
                }))
            })
            .collect();
        let listed: Vec<usize> = c.only_batches.clone().unwrap_or((0..nb).collect());
        let cdf = cumulative(listed.iter().map(|&b| (nb - b) as f64));
        let total = cdf.last().copied().unwrap_or(1.0);
        let batches = listed
            .iter()
            .zip(&cdf)
            .map(|(&b, &upto)| (b, (c.n_cells as f64 * upto / total).round() as u64))
            .collect();
        Hard {
            batches,
            type_cdf,
            interaction,
        }
    }
}

fn normal(rng: &mut Xoshiro256PlusPlus, sd: f64) -> f64 {
    Normal::new(0.0, sd).map(|d| d.sample(rng)).unwrap_or(0.0)
}

fn vecn(rng: &mut Xoshiro256PlusPlus, n: usize, sd: f64) -> Vec<f64> {
    (0..n).map(|_| normal(rng, sd)).collect()
}

impl World {
    fn new(c: &SimConfig) -> World {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(c.seed);
        let d = c.latent_dim;
        let load_sd = 0.5 / (d as f64).sqrt() * 2.0;
        let gene_base = vecn(&mut rng, c.n_genes, 1.2);
        let max = gene_base.iter().cloned().fold(f64::MIN, f64::max);
        let exp: Vec<f64> = gene_base.iter().map(|b| (b - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        let mut world = World {
            centres: (0..c.n_types).map(|_| vecn(&mut rng, d, 2.0)).collect(),
            gene_load: (0..c.n_genes).map(|_| vecn(&mut rng, d, load_sd)).collect(),
            gene_batch: (0..c.n_batches)
                .map(|_| vecn(&mut rng, c.n_genes, 0.3))
                .collect(),
            gene_theta: (0..c.n_genes)
                .map(|_| rng.random_range(2.0..20.0))
                .collect(),
            gene_dropout: (0..c.n_genes).map(|_| rng.random_range(0.0..0.2)).collect(),
            ambient: exp.iter().map(|e| e / total).collect(),
            gene_base,
            batch_depth: vecn(&mut rng, c.n_batches, 0.3),
            batch_ambient: (0..c.n_batches)
                .map(|_| rng.random_range(0.0..0.05))
                .collect(),
            prot_load: (0..c.n_proteins)
                .map(|_| vecn(&mut rng, d, load_sd * 2.0))
                .collect(),
            prot_background: (0..c.n_batches)
                .map(|_| {
                    (0..c.n_proteins)
                        .map(|_| rng.random_range(5.0..40.0))
                        .collect()
                })
                .collect(),
            peak_base: (0..c.n_peaks)
                .map(|_| rng.random_range(-4.0..-1.0))
                .collect(),
            peak_load: (0..c.n_peaks)
                .map(|_| vecn(&mut rng, d, load_sd * 2.0))
                .collect(),
            peak_batch: vecn(&mut rng, c.n_batches, 0.3),
            hard: None,
        };
        if c.scenario == Scenario::Hard {
            world.hard = Some(Hard::new(c, &mut rng, &mut world));
        }
        world
    }

    /// Cell `cell`'s (type, batch).
    fn draw_cell(&self, c: &SimConfig, cell: u64, rng: &mut Xoshiro256PlusPlus) -> (usize, usize) {
        if let Some(h) = &self.hard {
            let b = h
                .batches
                .iter()
                .find(|&&(_, end)| cell < end)
                .map_or(h.batches[h.batches.len() - 1].0, |&(b, _)| b);
            return (pick(rng, &h.type_cdf[b]), b);
        }
        let t = rng.random_range(0..c.n_types);
        let b = match &c.only_batches {
            Some(list) => list[rng.random_range(0..list.len())],
            None => rng.random_range(0..c.n_batches),
        };
        (t, b)
    }

    /// The log-scale expression shift of gene g beyond the gene-wise batch effect.
    fn interaction(&self, t: usize, b: usize, g: usize) -> f64 {
        self.hard
            .as_ref()
            .map_or(0.0, |h| h.interaction[b][t / SUBTYPES][g])
    }
}

/// NB(mean, theta) as a Poisson-Gamma mixture.
fn nb(rng: &mut Xoshiro256PlusPlus, mean: f64, theta: f64) -> f32 {
    if mean <= 0.0 {
        return 0.0;
    }
    let rate = Gamma::new(theta, mean / theta)
        .map(|g| g.sample(rng))
        .unwrap_or(mean);
    if rate <= 0.0 {
        0.0
    } else {
        Poisson::new(rate)
            .map(|p| p.sample(rng) as f32)
            .unwrap_or(0.0)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One simulated block of cells.
struct Block {
    types: Vec<i32>,
    batches: Vec<i32>,
    latent: Vec<f32>,
    rna: Csr,
    prot: Option<(Csr, Vec<bool>)>,
    atac: Option<(Csr, Vec<bool>)>,
}

fn simulate_block(c: &SimConfig, w: &World, block: u64) -> Block {
    let start = block * BLOCK;
    let n = BLOCK.min(c.n_cells - start) as usize;
    let mut rng =
        Xoshiro256PlusPlus::seed_from_u64(c.seed ^ (block + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = Block {
        types: Vec::with_capacity(n),
        batches: Vec::with_capacity(n),
        latent: Vec::with_capacity(n * c.latent_dim),
        rna: Csr {
            n_rows: 0,
            n_cols: c.n_genes,
            indptr: vec![0],
            ..Default::default()
        },
        prot: (c.n_proteins > 0).then(|| {
            (
                Csr {
                    n_rows: 0,
                    n_cols: c.n_proteins,
                    indptr: vec![0],
                    ..Default::default()
                },
                Vec::new(),
            )
        }),
        atac: (c.n_peaks > 0).then(|| {
            (
                Csr {
                    n_rows: 0,
                    n_cols: c.n_peaks,
                    indptr: vec![0],
                    ..Default::default()
                },
                Vec::new(),
            )
        }),
    };
    let lib = LogNormal::new(c.library.ln(), 0.5).ok();
    let mut logits = vec![0.0f64; c.n_genes];
    for i in 0..n {
        let (t, b) = w.draw_cell(c, start + i as u64, &mut rng);
        let z: Vec<f64> = w.centres[t]
            .iter()
            .map(|m| m + normal(&mut rng, 0.5))
            .collect();
        out.types.push(t as i32);
        out.batches.push(b as i32);
        out.latent.extend(z.iter().map(|&v| v as f32));

        // RNA
        for (g, l) in logits.iter_mut().enumerate() {
            *l = w.gene_base[g]
                + dot(&w.gene_load[g], &z)
                + w.gene_batch[b][g]
                + w.interaction(t, b, g);
        }
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let library = lib.map(|d| d.sample(&mut rng)).unwrap_or(c.library) * w.batch_depth[b].exp();
        for (g, logit) in logits.iter().enumerate() {
            let rho = (logit - max).exp() / total;
            let mean = library * (rho + w.batch_ambient[b] * w.ambient[g]);
            let mut count = nb(&mut rng, mean, w.gene_theta[g]);
            if count > 0.0 && rng.random::<f64>() < w.gene_dropout[g] {
                count = 0.0;
            }
            if count > 0.0 {
                out.rna.indices.push(g as u32);
                out.rna.data.push(count);
            }
        }
        out.rna.indptr.push(out.rna.data.len() as u64);
        out.rna.n_rows += 1;

        // Protein
        let missing_batch = c.missing_batches.contains(&b);
        if let Some((csr, present)) = &mut out.prot {
            let here = rng.random::<f64>() >= c.missing && !missing_batch;
            let counts: Vec<f32> = w
                .prot_load
                .iter()
                .enumerate()
                .map(|(p, load)| {
                    let fore = 20.0 * dot(load, &z).exp().min(1e3);
                    nb(&mut rng, w.prot_background[b][p] + fore, 10.0)
                })
                .collect();
            push_present(csr, present, here, &counts);
        }

        // ATAC
        if let Some((csr, present)) = &mut out.atac {
            let here = rng.random::<f64>() >= c.missing && !missing_batch;
            let depth = normal(&mut rng, 0.5);
            let open: Vec<f32> = w
                .peak_load
                .iter()
                .enumerate()
                .map(|(r, load)| {
                    let logit = w.peak_base[r] + dot(load, &z) + depth + w.peak_batch[b];
                    f32::from(u8::from(rng.random::<f64>() < 1.0 / (1.0 + (-logit).exp())))
                })
                .collect();
            push_present(csr, present, here, &open);
        }
    }
    out
}

/// Appends a cell's row of a non-RNA modality when it was measured (`here`), and its presence.
fn push_present(csr: &mut Csr, present: &mut Vec<bool>, here: bool, values: &[f32]) {
    present.push(here);
    if !here {
        return;
    }
    for (j, &v) in values.iter().enumerate() {
        if v > 0.0 {
            csr.indices.push(j as u32);
            csr.data.push(v);
        }
    }
    csr.indptr.push(csr.data.len() as u64);
    csr.n_rows += 1;
}

/// Simulates and writes a store at `location` (which must not hold a store yet). Writes an
/// AnnData store when only RNA is asked for, a MuData store otherwise. `progress` is called
/// with the number of cells written so far.
/// The batch column: every batch's name, or only the listed batches' (codes renumbered).
fn batch_column(codes: Vec<i32>, names: &[String], only: Option<&[usize]>) -> Column {
    match only {
        None => Column::Categorical {
            codes,
            categories: names.to_vec(),
            ordered: false,
        },
        Some(list) => Column::Categorical {
            codes: codes
                .iter()
                .map(|&b| {
                    list.iter()
                        .position(|&l| l as i32 == b)
                        .map_or(-1, |p| p as i32)
                })
                .collect(),
            categories: list.iter().map(|&b| names[b].clone()).collect(),
            ordered: false,
        },
    }
}

pub fn simulate(
    location: &str,
    c: &SimConfig,
    mut progress: impl FnMut(u64),
) -> Result<SimSummary> {
    let invalid = |reason: &str| DataError::Invalid {
        store: location.into(),
        path: "simulate".into(),
        problem: reason.into(),
    };
    if c.n_cells == 0 || c.n_genes == 0 || c.n_types == 0 || c.n_batches == 0 || c.latent_dim == 0 {
        return Err(invalid(
            "cells, genes, types, batches and latent dimensions must be positive",
        ));
    }
    if !(0.0..1.0).contains(&c.missing) || c.library.is_nan() || c.library <= 0.0 {
        return Err(invalid("missing must be in [0, 1) and library positive"));
    }
    if c.scenario == Scenario::Hard
        && (!c.n_types.is_multiple_of(SUBTYPES) || c.n_types < 2 * SUBTYPES || c.n_batches < 2)
    {
        return Err(invalid(&format!(
            "the hard scenario needs types in lineages of {SUBTYPES} (a multiple of {SUBTYPES}, at least {}) and at least 2 batches",
            2 * SUBTYPES
        )));
    }
    if c.missing_batches.iter().any(|&b| b >= c.n_batches) {
        return Err(invalid("missing_batches must be batches below n_batches"));
    }
    if let Some(list) = &c.only_batches
        && (list.is_empty()
            || list.iter().any(|&b| b >= c.n_batches)
            || list.windows(2).any(|w| w[0] >= w[1]))
    {
        return Err(invalid(
            "only_batches must list ascending, distinct batches below n_batches",
        ));
    }
    let mudata = c.n_proteins > 0 || c.n_peaks > 0;
    let w = World::new(c);
    let writer = StoreWriter::create(location, c.version)?;
    let rna_path = if mudata { "mod/rna" } else { "" };
    let join = |base: &str, name: &str| {
        if base.is_empty() {
            name.to_string()
        } else {
            format!("{base}/{name}")
        }
    };

    let mut rna = writer.csr(&join(rna_path, "X"), c.n_genes as u64)?;
    let mut prot = if c.n_proteins > 0 {
        Some(writer.csr("mod/prot/X", c.n_proteins as u64)?)
    } else {
        None
    };
    let mut atac = if c.n_peaks > 0 {
        Some(writer.csr("mod/atac/X", c.n_peaks as u64)?)
    } else {
        None
    };
    let mut types = Vec::with_capacity(c.n_cells as usize);
    let mut batches = Vec::with_capacity(c.n_cells as usize);
    let mut latent = Vec::with_capacity(c.n_cells as usize * c.latent_dim);
    let mut n_counts = Vec::with_capacity(c.n_cells as usize);
    let mut prot_present = Vec::new();
    let mut atac_present = Vec::new();

    // Blocks are simulated in parallel a wave at a time and written in order, so memory holds
    // one wave regardless of n_cells.
    let n_blocks = c.n_cells.div_ceil(BLOCK);
    let wave = rayon::current_num_threads() as u64 * 2;
    let mut next = 0;
    while next < n_blocks {
        let end = (next + wave).min(n_blocks);
        let blocks: Vec<Block> = (next..end)
            .into_par_iter()
            .map(|b| simulate_block(c, &w, b))
            .collect();
        for block in blocks {
            n_counts.extend(block.rna.row_sums().into_iter().map(f64::from));
            rna.push(&block.rna)?;
            if let (Some(writer), Some((csr, present))) = (prot.as_mut(), block.prot) {
                writer.push(&csr)?;
                prot_present.extend(present);
            }
            if let (Some(writer), Some((csr, present))) = (atac.as_mut(), block.atac) {
                writer.push(&csr)?;
                atac_present.extend(present);
            }
            types.extend(block.types);
            batches.extend(block.batches);
            latent.extend(block.latent);
        }
        next = end;
        progress((next * BLOCK).min(c.n_cells));
    }
    rna.finish()?;

    let names = |prefix: &str, n: usize| -> Vec<String> {
        let width = n.to_string().len();
        (0..n).map(|i| format!("{prefix}{i:0width$}")).collect()
    };
    let cell_names = names("cell", c.n_cells as usize);
    let lineages = (c.scenario == Scenario::Hard).then(|| Column::Categorical {
        codes: types.iter().map(|&t| t / SUBTYPES as i32).collect(),
        categories: names("lineage", c.n_types / SUBTYPES),
        ordered: false,
    });
    let mut obs_columns = vec![
        (
            "batch".to_string(),
            batch_column(
                batches,
                &names("batch", c.n_batches),
                c.only_batches.as_deref(),
            ),
        ),
        (
            "cell_type".to_string(),
            Column::Categorical {
                codes: types,
                categories: names("type", c.n_types),
                ordered: false,
            },
        ),
        ("n_counts".to_string(), Column::Float(n_counts)),
    ];
    obs_columns.extend(lineages.map(|l| ("lineage".to_string(), l)));
    let gene_names = names("gene", c.n_genes);
    let mut modalities = vec![("rna".to_string(), c.n_cells, c.n_genes as u64)];

    if mudata {
        let mut layouts = vec![ModalityLayout {
            name: "rna".into(),
            present: None,
            var_names: gene_names,
        }];
        for (name, present, writer_opt, n_vars, prefix) in [
            ("prot", &prot_present, prot.take(), c.n_proteins, "prot"),
            ("atac", &atac_present, atac.take(), c.n_peaks, "peak"),
        ] {
            let Some(csr) = writer_opt else { continue };
            csr.finish()?;
            let n_present = present.iter().filter(|&&p| p).count();
            modalities.push((name.to_string(), n_present as u64, n_vars as u64));
            layouts.push(ModalityLayout {
                name: name.into(),
                present: Some(present.clone()),
                var_names: names(prefix, n_vars),
            });
        }
        writer.mudata(&cell_names, &obs_columns, &layouts)?;
    } else {
        writer.anndata("", &cell_names, &obs_columns, &gene_names)?;
    }
    writer.array_2d(
        "obsm/X_true_latent",
        Elem::F32,
        c.n_cells,
        c.latent_dim as u64,
        latent,
        json!({"encoding-type": "array", "encoding-version": "0.2.0"}),
    )?;
    writer.consolidate()?;
    Ok(SimSummary {
        n_cells: c.n_cells,
        modalities,
        mudata,
    })
}
