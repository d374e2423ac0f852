//! Progress hooks: a PL run with a two-step schedule reports every phase to the installed
//! sink, and each counted phase advances exactly to its total before it finishes.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use plprune_onnx::criteria::gate::GateConfig;
use plprune_onnx::criteria::{Criterion, Schedule, ScoringConfig};
use plprune_onnx::engine::DeviceChoice;
use plprune_onnx::progress::{self, Progress};
use plprune_onnx::{Config, Session};

#[derive(Default)]
struct Record(Mutex<Vec<(String, u64, u64, bool)>>);

impl Progress for Record {
    fn begin(&self, label: &str, total: u64) {
        self.0.lock().unwrap().push((label.to_string(), total, 0, false));
    }
    fn inc(&self, n: u64) {
        let mut v = self.0.lock().unwrap();
        let last = v.last_mut().expect("inc before any begin");
        assert!(!last.3, "inc after finish of {}", last.0);
        last.2 += n;
    }
    fn finish(&self) {
        self.0.lock().unwrap().last_mut().expect("finish before any begin").3 = true;
    }
}

#[test]
fn pl_run_reports_every_phase_with_exact_counts() {
    let config = Config {
        criterion: Criterion::Pl,
        calib: Some(shared("digits/img_train.npz")),
        device: DeviceChoice::Cpu,
        scoring: ScoringConfig {
            projections: 2,
            probes: 3,
            calib_samples: 8,
            gate: GateConfig { epochs: 4, ..GateConfig::default() },
            schedule: Schedule::Linear { steps: 2 },
            ..ScoringConfig::default()
        },
        ..Config::default()
    };
    let mut s = Session::open(&shared("digits/vgg_bn.onnx"), config).unwrap();
    let rec = Arc::new(Record::default());
    {
        let _g = progress::install(rec.clone());
        s.analyze().unwrap();
        s.select().unwrap();
    }
    let events = rec.0.lock().unwrap().clone();
    let labels: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(labels[0], "calibration forward", "{labels:?}");
    for step in 1..=2 {
        let grams = format!("step {step}/2: NTK Grams (projections)");
        let gate = format!("step {step}/2: gate training (epochs)");
        assert!(labels.contains(&grams.as_str()) && labels.contains(&gate.as_str()), "{labels:?}");
    }
    // Step 2 scores the masked model: its Hessian traces come from Hutchinson probes.
    assert!(labels.contains(&"step 2/2: Hessian traces (probes)"), "{labels:?}");
    for (label, total, done, finished) in &events {
        assert!(finished, "{label} never finished");
        if *total > 0 {
            assert_eq!(done, total, "{label}: {done} of {total} steps reported");
        }
    }
    let want = |l: &str| events.iter().find(|e| e.0.ends_with(l)).unwrap().1;
    assert_eq!(want("NTK Grams (projections)"), 2);
    assert_eq!(want("Hessian traces (probes)"), 3);
    assert_eq!(want("gate training (epochs)"), 5);
    // Nothing is reported once the sink is uninstalled.
    let n = rec.0.lock().unwrap().len();
    progress::begin("after", 1);
    assert_eq!(rec.0.lock().unwrap().len(), n);
}
