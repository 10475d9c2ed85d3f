//! `--draft-device K` on a backend without numbered devices (the CPU): refused, typed,
//! before anything loads; without it, the draft runs beside the target as before.

use std::sync::Arc;

use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BackendError};
use specula::model::{load_model, ModelSource, Preset, WeightDtype};
use specula::spec::{ProposerChoice, SpecError, SpecMethod};

fn choice(method: SpecMethod, draft_device: Option<usize>) -> ProposerChoice {
    ProposerChoice {
        method,
        draft_model: Some(ModelSource::Dummy(Preset::SmolLm2_135m)),
        draft_layers: 2,
        draft_kv_blocks: 8,
        draft_dtype: WeightDtype::Auto,
        lookahead: Default::default(),
        draft_device,
    }
}

#[test]
fn a_draft_device_on_the_cpu_is_refused_typed() {
    let target = Arc::new(load_model(&ModelSource::Dummy(Preset::SmolLm2_135m), &CpuBackend::new()).unwrap().model);
    let new_backend = || Ok::<_, BackendError>(CpuBackend::new());
    for method in [SpecMethod::Draft, SpecMethod::EarlyExit] {
        match choice(method, Some(0)).build(&target, None, &new_backend) {
            Err(SpecError::Backend(BackendError::NoDevices { backend: "cpu" })) => {}
            Err(e) => panic!("{method:?}: expected NoDevices, got {e}"),
            Ok(_) => panic!("{method:?}: a device number on the CPU was accepted"),
        }
    }
    assert!(CpuBackend::new().device_ordinal().is_none());
    let early_exit = choice(SpecMethod::EarlyExit, None).build(&target, None, &new_backend);
    assert!(early_exit.is_ok_and(|p| p.is_some()), "without a device number the proposer is built as before");
}
