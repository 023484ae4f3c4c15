//! GPU entry points of the elementwise ops (kernels in `elementwise.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::{Activation, CUDA_SOURCE};
use crate::cuda::{Gpu, Result, View, ViewMut, launch};
use crate::cuda_cache::DeviceBuf;

pub fn activation_forward(
    gpu: &Gpu,
    act: Activation,
    x: &View<'_>,
    y: &mut ViewMut<'_>,
) -> Result<()> {
    assert_eq!(x.len(), y.len(), "activation: lengths");
    let f = gpu.function("elementwise", CUDA_SOURCE, "activation_forward")?;
    let (kind, a) = act.code();
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&kind).arg(&a).arg(x).arg(y).arg(&n);
    launch(b, x.len(), "activation_forward")
}

pub fn activation_backward(
    gpu: &Gpu,
    act: Activation,
    x: &View<'_>,
    y: &View<'_>,
    dy: &View<'_>,
    dx: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        x.len() == y.len() && y.len() == dy.len() && dy.len() == dx.len(),
        "activation backward: lengths"
    );
    let f = gpu.function("elementwise", CUDA_SOURCE, "activation_backward")?;
    let (kind, a) = act.code();
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&kind).arg(&a).arg(x).arg(y).arg(dy).arg(dx).arg(&n);
    launch(b, x.len(), "activation_backward")
}

pub fn bias_add_forward(gpu: &Gpu, y: &mut ViewMut<'_>, bias: &View<'_>) -> Result<()> {
    let cols = bias.len();
    assert!(cols > 0 && y.len().is_multiple_of(cols), "bias add: shapes");
    let f = gpu.function("elementwise", CUDA_SOURCE, "bias_add_forward")?;
    let n = y.len();
    let (rows, cols64) = ((n / cols) as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(bias).arg(&rows).arg(&cols64);
    launch(b, n, "bias_add_forward")
}

pub fn column_sums(gpu: &Gpu, m: &View<'_>, out: &mut ViewMut<'_>) -> Result<()> {
    let cols = out.len();
    assert!(
        cols > 0 && m.len().is_multiple_of(cols),
        "column sums: shapes"
    );
    let f = gpu.function("elementwise", CUDA_SOURCE, "bias_add_backward")?;
    let (rows, cols64) = ((m.len() / cols) as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(out).arg(&rows).arg(&cols64);
    launch(b, cols, "column_sums")
}

/// As [`super::fill_scaled`], the factor read from `cell` (f64 bits) when the kernel runs.
pub fn fill_scaled(
    gpu: &Gpu,
    cell: &cudarc::driver::CudaSlice<u64>,
    share: f64,
    y: &mut ViewMut<'_>,
) -> Result<()> {
    let f = gpu.function("elementwise", CUDA_SOURCE, "fill_scaled")?;
    let n = y.len();
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(cell).arg(&share).arg(&n64);
    launch(b, n, "fill_scaled")
}

/// As [`super::axpy`]: y += alpha x.
pub fn axpy(gpu: &Gpu, alpha: f32, x: &View<'_>, y: &mut ViewMut<'_>) -> Result<()> {
    assert_eq!(x.len(), y.len(), "axpy: lengths");
    let f = gpu.function("elementwise", CUDA_SOURCE, "axpy")?;
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&alpha).arg(x).arg(y).arg(&n);
    launch(b, x.len(), "axpy")
}

/// y *= alpha.
pub fn scale(gpu: &Gpu, y: &mut ViewMut<'_>, alpha: f32) -> Result<()> {
    let f = gpu.function("elementwise", CUDA_SOURCE, "scale")?;
    let n = y.len();
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(&alpha).arg(&n64);
    launch(b, n, "scale")
}

/// As [`super::scale_rows`].
pub fn scale_rows(gpu: &Gpu, x: &View<'_>, s: &View<'_>, y: &mut ViewMut<'_>) -> Result<()> {
    assert!(
        x.len() == y.len()
            && (s.is_empty() && x.is_empty() || !s.is_empty() && x.len().is_multiple_of(s.len())),
        "scale rows: {} values are not {} rows",
        x.len(),
        s.len()
    );
    if x.is_empty() {
        return Ok(());
    }
    let f = gpu.function("elementwise", CUDA_SOURCE, "scale_rows")?;
    let (rows, cols) = (s.len() as u64, (x.len() / s.len()) as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(s).arg(y).arg(&rows).arg(&cols);
    launch(b, x.len(), "scale_rows")
}

/// The host's row codes on the device, each checked against the table's rows.
fn codes_on_device(gpu: &Gpu, codes: &[usize], table_rows: usize) -> Result<DeviceBuf<u64>> {
    assert!(
        codes.iter().all(|&c| c < table_rows),
        "row code out of range: the table has {table_rows} rows"
    );
    let codes: Vec<u64> = codes.iter().map(|&c| c as u64).collect();
    gpu.upload(&codes)
}

/// As [`super::leading_columns`].
pub fn leading_columns(
    gpu: &Gpu,
    m: &View<'_>,
    cols: usize,
    k: usize,
    out: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        0 < cols && k <= cols && m.len().is_multiple_of(cols) && out.len() == m.len() / cols * k,
        "leading columns: {} values of {cols} columns into {} of {k}",
        m.len(),
        out.len()
    );
    launch_on_leading("leading_columns", gpu, m, (cols, k), out)
}

/// As [`super::first_positive`].
pub fn first_positive(
    gpu: &Gpu,
    m: &View<'_>,
    cols: usize,
    k: usize,
    out: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        k <= cols && cols > 0 && m.len().is_multiple_of(cols) && out.len() == m.len() / cols,
        "first positive: {} values of {cols} columns into {} codes",
        m.len(),
        out.len()
    );
    launch_on_leading("first_positive", gpu, m, (cols, k), out)
}

/// Launches `kernel(m, out, rows, cols, k)` over `out`'s values: the kernels that read the
/// first `k` of `m`'s `cols` columns (shapes checked by the caller).
fn launch_on_leading(
    kernel: &'static str,
    gpu: &Gpu,
    m: &View<'_>,
    (cols, k): (usize, usize),
    out: &mut ViewMut<'_>,
) -> Result<()> {
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("elementwise", CUDA_SOURCE, kernel)?;
    let (rows, cols64, k64) = ((m.len() / cols) as u64, cols as u64, k as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(out).arg(&rows).arg(&cols64).arg(&k64);
    launch(b, n, kernel)
}

/// Whether row i is coded i throughout (a batch whose cells all have every modality).
fn is_identity(codes: &[usize]) -> bool {
    codes.iter().enumerate().all(|(i, &c)| i == c)
}

/// As [`super::gather_rows`]: out row i = table row codes[i].
pub fn gather_rows(
    gpu: &Gpu,
    table: &View<'_>,
    codes: &[usize],
    cols: usize,
    out: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        cols > 0 && out.len() == codes.len() * cols && table.len().is_multiple_of(cols),
        "gather: shapes"
    );
    if codes.is_empty() {
        return Ok(());
    }
    if is_identity(codes) && out.len() <= table.len() {
        // The first rows in order: a device copy, with no codes from the host (a step
        // captured as a CUDA graph may not copy from host memory).
        return gpu.copy_into(&table.slice(0..out.len()), out);
    }
    let codes_d = codes_on_device(gpu, codes, table.len() / cols)?;
    let f = gpu.function("elementwise", CUDA_SOURCE, "gather_rows")?;
    let (rows, cols64) = (codes.len() as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(table).arg(&codes_d).arg(out).arg(&rows).arg(&cols64);
    launch(b, codes.len() * cols, "gather_rows")
}

/// As [`super::scatter_add_rows`]: table (overwritten) row g = Σ of the rows coded g.
pub fn scatter_add_rows(
    gpu: &Gpu,
    x: &View<'_>,
    codes: &[usize],
    cols: usize,
    table: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        cols > 0 && x.len() == codes.len() * cols && table.len().is_multiple_of(cols),
        "scatter: shapes"
    );
    let (n, groups) = (table.len(), table.len() / cols);
    if codes.is_empty() {
        return gpu
            .stream()
            .memset_zeros(table)
            .map_err(crate::cuda::driver("zeroing the table"));
    }
    if is_identity(codes) && codes.len() == groups {
        // Each row its own group: 0 + x, as the kernel sums it, with no codes from the host.
        gpu.stream()
            .memset_zeros(table)
            .map_err(crate::cuda::driver("zeroing the table"))?;
        return axpy(gpu, 1.0, x, table);
    }
    let by_group = gpu.upload(&rows_by_group(codes, groups))?;
    let f = gpu.function("elementwise", CUDA_SOURCE, "scatter_add_rows")?;
    let (groups64, cols64) = (groups as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(&by_group)
        .arg(table)
        .arg(&groups64)
        .arg(&cols64);
    launch(b, n, "scatter_add_rows")
}

/// `groups` + 1 offsets, then the rows ordered by their code (ascending within a group): the
/// scatter kernel's index, made in one pass over the codes.
fn rows_by_group(codes: &[usize], groups: usize) -> Vec<u64> {
    assert!(
        codes.iter().all(|&c| c < groups),
        "row code out of range: the table has {groups} rows"
    );
    let mut index = vec![0u64; groups + 1 + codes.len()];
    for &c in codes {
        index[c + 1] += 1;
    }
    for g in 0..groups {
        index[g + 1] += index[g];
    }
    let (starts, rows) = index.split_at_mut(groups + 1);
    let mut next: Vec<u64> = starts[..groups].to_vec();
    for (r, &c) in codes.iter().enumerate() {
        rows[next[c] as usize] = r as u64;
        next[c] += 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::rows_by_group;

    #[test]
    fn rows_by_group_lists_each_groups_rows_in_order() {
        // Rows 0..6 coded 2, 0, 2, 3, 0, 2 into 5 groups (group 1 and 4 empty).
        let index = rows_by_group(&[2, 0, 2, 3, 0, 2], 5);
        assert_eq!(&index[..6], &[0, 2, 2, 5, 6, 6]);
        assert_eq!(&index[6..], &[1, 4, 0, 2, 5, 3]);
        assert_eq!(rows_by_group(&[], 2), vec![0, 0, 0]);
    }
}
