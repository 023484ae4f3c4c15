//! tessera's gRPC protocols, compiled by tonic/prost: `tessera/v1/coordinator.proto` (the
//! coordinator serves `Coordinator`; workers and users call it) and `tessera/v1/atlas.proto`
//! (`tessera serve` serves `Atlas`: query mapping as a service).
#![allow(missing_debug_implementations, clippy::all)] // generated code

pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{Assignment, JobSpec};

    #[test]
    fn an_assignment_survives_the_wire() {
        let a = Assignment {
            assigned: true,
            job_id: "job-1".into(),
            generation: 3,
            rank: 1,
            world_size: 4,
            peers: vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()],
            nccl_unique_id: vec![7; 128],
            spec: Some(JobSpec {
                data_url: "s3://atlas/x.zarr".into(),
                world_size: 4,
                ..JobSpec::default()
            }),
            resume_from: "ckpt/epoch-10".into(),
            start_epoch: 10,
        };
        let bytes = a.encode_to_vec();
        assert_eq!(Assignment::decode(bytes.as_slice()).ok(), Some(a));
    }
}
