//! tessera-models: the VAE family of the review (scVI-style VAEs and multimodal VAEs with
//! product-/mixture-of-experts or concatenated posteriors and missing-modality masking;
//! regularisers and supervised heads on the latent space),
//! written once against the engine's `Backend` so the same model trains on CPU or CUDA.
//!
//! Invariant: models know nothing of stores or the network; they take host minibatches (CSR
//! counts + one-hot covariates) and return loss terms, gradients and embeddings.

pub mod config;
mod heads;
pub mod layers;
pub mod likelihood;
mod modality;
mod pending;
pub mod surgery;
pub mod train;
pub mod vae;

pub use config::ConfigError;
pub use modality::ENCODER_TRANSFORM;
pub use pending::PendingLoss;
pub use train::{
    Gradients, Optimizer, Overlapped, Plateau, ResidentData, TrainConfig, TrainError, Trainer,
};
pub use vae::{
    Categories, Dispersion, Joint, LikelihoodKind, LossTerms, ModalityConfig, ModalityCounts,
    ModalitySpec, OnDevice, Prior, Supervision, Survival, Vae, VaeBatch, VaeConfig,
};
