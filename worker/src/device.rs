//! Where a process computes, chosen once at start-up (`--device cpu|cuda|cuda:N`): every
//! entry point matches on [`Device`] once and runs its generic body on that backend.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tessera_kernels::backend::Cuda;
use tessera_kernels::cuda::Gpu;
use tessera_kernels::ops::linear::MatmulPrecision;

use crate::records::FitError;

/// A compute device: the CPU, or a GPU (`Cuda(None)`: the launcher's local rank, else GPU 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Device {
    #[default]
    Cpu,
    Cuda(Option<usize>),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Device::Cuda(Some(n)))
                .ok_or_else(|| format!("device {other:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for Device {
    type Error = String;

    fn try_from(s: String) -> Result<Device, String> {
        s.parse()
    }
}

impl Device {
    /// The GPU ordinal this device means: explicit, else the launcher's `LOCAL_RANK` (one
    /// process per GPU under torchrun / Kubeflow), else 0. None for the CPU.
    pub fn ordinal(&self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Cuda(Some(n)) => Some(*n),
            Device::Cuda(None) => Some(
                std::env::var("LOCAL_RANK")
                    .ok()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
            ),
        }
    }

    /// Opens the GPU (f32 GEMMs on TF32 tensor cores with `tf32`), or says what was looked for
    /// and not found (driver, device, libraries).
    pub fn cuda(&self, tf32: bool) -> Result<Cuda, FitError> {
        let ordinal = self.ordinal().ok_or_else(|| FitError::Device {
            device: self.to_string(),
            reason: "not a GPU".into(),
        })?;
        let gpu = Gpu::new(ordinal).map_err(|e| FitError::Device {
            device: format!("cuda:{ordinal}"),
            reason: format!("{e}; {}", tessera_kernels::cuda_libs::found()),
        })?;
        let described = gpu.describe().unwrap_or_else(|e| e.to_string());
        let precision = MatmulPrecision::tf32_or_f32(tf32);
        tracing::info!(device = %format!("cuda:{ordinal}"), gemm = precision.describe(), "{described}");
        Ok(Cuda::new(gpu.with_matmul(precision)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_print_and_refuse_what_they_are_not() {
        for (text, device) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(None)),
            ("cuda:3", Device::Cuda(Some(3))),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), device);
            assert_eq!(device.to_string(), text);
        }
        assert_eq!("gpu".parse::<Device>().unwrap(), Device::Cuda(None));
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(Device::Cpu.ordinal(), None);
        assert_eq!(Device::Cuda(Some(2)).ordinal(), Some(2));
        let json = serde_json::to_string(&Device::Cuda(Some(1))).unwrap();
        assert_eq!(json, "\"cuda:1\"");
        assert_eq!(
            serde_json::from_str::<Device>(&json).unwrap(),
            Device::Cuda(Some(1))
        );
    }

    #[test]
    fn a_gpu_asked_for_where_there_is_none_is_an_error_naming_it() {
        if tessera_kernels::cuda::Gpu::new(0).is_ok() {
            eprintln!("SKIPPED: a GPU is present; the missing-device error is not reachable");
            return;
        }
        let e = Device::Cuda(Some(0)).cuda(false).unwrap_err().to_string();
        assert!(e.contains("cuda:0"), "{e}");
        assert!(e.contains("libcuda") || e.contains("device"), "{e}");
        let e = Device::Cpu.cuda(false).unwrap_err().to_string();
        assert!(e.contains("cpu") && e.contains("not a GPU"), "{e}");
    }
}
