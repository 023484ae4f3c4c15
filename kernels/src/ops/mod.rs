//! One module per op family: the CPU reference (forward and backward, generic over f32/f64),
//! the CUDA source it is held to (`*.cu`, compiled by NVRTC at run time), and its tests.

pub mod affinity;
pub mod dropout;
pub mod elementwise;
pub mod gaussian;
pub mod likelihood;
pub mod linear;
pub mod losses;
pub mod norm;
pub mod optim;
