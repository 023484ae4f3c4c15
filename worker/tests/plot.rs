//! `plot_store` end to end on a simulated store: one panel per obs column, coloured with
//! scanpy's palette, and bad requests refused by name before anything is written.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashSet;
use std::path::Path;

use tessera_data::SimConfig;
use tessera_worker::EvalError;
use tessera_worker::plot::{PlotRequest, plot_store};

fn simulated(dir: &Path) -> String {
    let location = dir.join("sim.zarr").display().to_string();
    let config = SimConfig {
        n_cells: 600,
        n_genes: 40,
        n_types: 4,
        n_batches: 3,
        ..SimConfig::default()
    };
    tessera_data::simulate(&location, &config, |_| {}).unwrap();
    location
}

fn request(data: &str, out: &Path) -> PlotRequest {
    PlotRequest {
        data: data.into(),
        modality: None,
        embedding_key: "X_true_latent".into(),
        color: Vec::new(),
        max_cells: None,
        seed: 0,
        out: out.to_path_buf(),
        layout_key: None,
        overwrite: false,
    }
}

/// The picture's size and the set of its pixel colours in columns `x0..x1`.
fn colours(path: &Path, x0: u32, x1: u32) -> ((u32, u32), HashSet<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let seen = pixels
        .chunks_exact(3)
        .enumerate()
        .filter(|(i, _)| (x0..x1).contains(&((*i as u32) % info.width)))
        .map(|(_, p)| [p[0], p[1], p[2]])
        .collect();
    ((info.width, info.height), seen)
}

#[test]
fn cell_types_and_batches_are_drawn_side_by_side_in_scanpys_colours() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let out = dir.path().join("umap.png");
    let report = plot_store(&request(&data, &out)).unwrap();
    assert_eq!(report.color, ["cell_type", "batch"]);
    assert_eq!((report.n_obs, report.n_drawn), (600, 600));
    let (size, left) = colours(&out, 0, 660);
    assert_eq!(size, (1320, 560));
    let (_, right) = colours(&out, 660, 1320);
    // scanpy's first colours: blue, orange, green, red (4 types left; 3 batches right).
    let palette = [
        [0x1f, 0x77, 0xb4],
        [0xff, 0x7f, 0x0e],
        [0x27, 0x9e, 0x68],
        [0xd6, 0x27, 0x28],
    ];
    for c in &palette {
        assert!(left.contains(c), "cell-type panel lacks {c:?}");
    }
    for c in &palette[..3] {
        assert!(right.contains(c), "batch panel lacks {c:?}");
    }
    assert!(!right.contains(&palette[3]), "a fourth batch colour");
    assert!(!out.with_extension("png.partial").exists());
}

#[test]
fn a_subsample_is_drawn_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let out = dir.path().join("sub.png");
    let req = PlotRequest {
        color: vec!["batch".into()],
        max_cells: Some(200),
        ..request(&data, &out)
    };
    let report = plot_store(&req).unwrap();
    assert_eq!((report.n_obs, report.n_drawn), (600, 200));
    assert_eq!(colours(&out, 0, 1).0, (660, 560));
}

#[test]
fn bad_requests_are_named_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let out = dir.path().join("mine.png");
    std::fs::write(&out, b"a user's file").unwrap();
    let err = plot_store(&request(&data, &out)).unwrap_err();
    assert!(
        matches!(err, EvalError::Output { .. }) && err.to_string().contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"a user's file");

    let fresh = dir.path().join("fresh.png");
    let unknown = PlotRequest {
        color: vec!["cell_type".into(), "tissue".into()],
        ..request(&data, &fresh)
    };
    let err = plot_store(&unknown).unwrap_err().to_string();
    assert!(err.contains("\"tissue\"") && err.contains("obs"), "{err}");
    let missing = PlotRequest {
        embedding_key: "X_nothing".into(),
        ..request(&data, &fresh)
    };
    let err = plot_store(&missing).unwrap_err().to_string();
    assert!(err.contains("X_nothing"), "{err}");
    assert!(!fresh.exists());

    // With --overwrite the file is replaced by a picture.
    let replace = PlotRequest {
        overwrite: true,
        ..request(&data, &out)
    };
    plot_store(&replace).unwrap();
    assert_eq!(&std::fs::read(&out).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn the_layout_is_stored_for_scanpy_only_whole_and_never_over_an_existing_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let stored = PlotRequest {
        layout_key: Some("X_umap".into()),
        ..request(&data, &dir.path().join("a.png"))
    };
    let report = plot_store(&stored).unwrap();
    assert_eq!(report.layout_element.as_deref(), Some("obsm/X_umap"));
    let adata = tessera_data::AnnData::open(&data).unwrap();
    let (layout, d) = adata.obsm("X_umap").unwrap();
    assert_eq!((layout.len(), d), (1200, 2));
    assert!(layout.iter().all(|v| v.is_finite()));

    // A second layout would replace it: refused before any work, picture included.
    let again = PlotRequest {
        seed: 3,
        ..PlotRequest {
            out: dir.path().join("b.png"),
            ..stored.clone()
        }
    };
    let err = plot_store(&again).unwrap_err().to_string();
    assert!(
        err.contains("obsm/X_umap") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(!dir.path().join("b.png").exists());
    assert_eq!(adata.obsm("X_umap").unwrap().0, layout);

    let sub = PlotRequest {
        layout_key: Some("X_sub".into()),
        max_cells: Some(100),
        ..request(&data, &dir.path().join("c.png"))
    };
    let err = plot_store(&sub).unwrap_err().to_string();
    assert!(err.contains("--max-cells 0"), "{err}");
}
