//! Hessian-vector products (central differences of f64 gradients) against the exact
//! Hessian of a tiny tanh MLP, computed independently with hyper-dual numbers (exact second
//! derivatives, no truncation error), under an MSE loss with a non-zero residual so the
//! second-order term of the network enters.

mod engine_util;

use std::collections::BTreeMap;

use engine_util::rand_vec;
use plprune_onnx::engine::{hvp, loss, Engine, Params};
use plprune_onnx::ir::{Model, Op, Value, ValueKind};
use plprune_onnx::tensor::{DType, Tensor};

const N: usize = 4;
const I: usize = 3;
const H: usize = 5;
const O: usize = 2;

fn op(name: &str, t: &str) -> Op {
    Op { name: name.into(), op_type: t.into(), domain: String::new(), attrs: vec![], origin: None }
}

fn value(m: &mut Model, name: &str, kind: ValueKind, shape: Vec<usize>) -> plprune_onnx::ir::Id {
    let mut v = Value::new(name, kind);
    v.shape = Some(shape);
    v.dtype = Some(DType::F32);
    m.add_value(v)
}

/// y = tanh(x·W1 + b1)·W2
fn mlp(w1: &[f64], b1: &[f64], w2: &[f64]) -> Model {
    let mut m = Model::default();
    let x = value(&mut m, "x", ValueKind::Input, vec![N, I]);
    let mut weight = |name: &str, dims: Vec<usize>, d: &[f64]| {
        let mut v = Value::new(name, ValueKind::Weight);
        v.set_data(Tensor::from_f64_as(DType::F64, dims, d));
        m.add_value(v)
    };
    let (w1, b1, w2) = (weight("w1", vec![I, H], w1), weight("b1", vec![H], b1), weight("w2", vec![H, O], w2));
    let h = value(&mut m, "h", ValueKind::Dynamic, vec![N, H]);
    let a = value(&mut m, "a", ValueKind::Dynamic, vec![N, H]);
    let t = value(&mut m, "t", ValueKind::Dynamic, vec![N, H]);
    let y = value(&mut m, "y", ValueKind::Dynamic, vec![N, O]);
    m.add_op(op("mm1", "MatMul"), &[Some(x), Some(w1)], &[h]);
    m.add_op(op("add", "Add"), &[Some(h), Some(b1)], &[a]);
    m.add_op(op("tanh", "Tanh"), &[Some(a)], &[t]);
    m.add_op(op("mm2", "MatMul"), &[Some(t), Some(w2)], &[y]);
    m.inputs.push(x);
    m.outputs.push(y);
    m
}

/// a + b·ε1 + c·ε2 + d·ε1ε2 with ε1² = ε2² = 0.
#[derive(Clone, Copy, Default)]
struct Hd(f64, f64, f64, f64);

impl Hd {
    fn c(a: f64) -> Hd {
        Hd(a, 0.0, 0.0, 0.0)
    }
    fn add(self, o: Hd) -> Hd {
        Hd(self.0 + o.0, self.1 + o.1, self.2 + o.2, self.3 + o.3)
    }
    fn mul(self, o: Hd) -> Hd {
        Hd(
            self.0 * o.0,
            self.0 * o.1 + self.1 * o.0,
            self.0 * o.2 + self.2 * o.0,
            self.0 * o.3 + self.1 * o.2 + self.2 * o.1 + self.3 * o.0,
        )
    }
    fn tanh(self) -> Hd {
        let t = self.0.tanh();
        let d1 = 1.0 - t * t;
        let d2 = -2.0 * t * d1;
        Hd(t, d1 * self.1, d1 * self.2, d1 * self.3 + d2 * self.1 * self.2)
    }
}

/// 0.5·mean((y − target)²) in hyper-dual arithmetic over the flat weight vector w.
fn loss_hd(x: &[f64], w: &[Hd], target: &[f64]) -> Hd {
    let (w1, rest) = w.split_at(I * H);
    let (b1, w2) = rest.split_at(H);
    let mut l = Hd::c(0.0);
    for s in 0..N {
        let mut t = [Hd::c(0.0); H];
        for j in 0..H {
            let mut a = b1[j];
            for i in 0..I {
                a = a.add(Hd::c(x[s * I + i]).mul(w1[i * H + j]));
            }
            t[j] = a.tanh();
        }
        for o in 0..O {
            let mut y = Hd::c(0.0);
            for j in 0..H {
                y = y.add(t[j].mul(w2[j * O + o]));
            }
            let d = y.add(Hd::c(-target[s * O + o]));
            l = l.add(d.mul(d).mul(Hd::c(0.5 / (N * O) as f64)));
        }
    }
    l
}

#[test]
fn hvp_matches_the_exact_hessian_of_a_tiny_mlp() {
    let w = rand_vec(I * H + H + H * O, 1);
    let x = rand_vec(N * I, 2);
    let target: Vec<f64> = rand_vec(N * O, 3).iter().map(|v| 2.0 * v).collect();
    let p = I * H + H + H * O;
    // Exact Hessian.
    let mut hess = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..p {
            let mut wh: Vec<Hd> = w.iter().map(|&v| Hd::c(v)).collect();
            wh[i].1 = 1.0;
            wh[j].2 = 1.0;
            hess[i * p + j] = loss_hd(&x, &wh, &target).3;
        }
    }
    let model = mlp(&w[..I * H], &w[I * H..I * H + H], &w[I * H + H..]);
    let engine = Engine::new(&model).expect("lower");
    let params: Params<f64> = engine.params(&model);
    let ids: Vec<_> = ["w1", "b1", "w2"].iter().map(|n| model.value_id(n).unwrap()).collect();
    let gp = engine.grad_program(&ids).unwrap();
    let inputs = vec![("x".to_string(), Tensor::from_f64_as(DType::F64, vec![N, I], &x))];
    let seed = |o: &loss::Outputs<f64>| loss::mse(o, 0, &target);
    for trial in 0..3 {
        let v = rand_vec(p, 10 + trial);
        let mut vm = BTreeMap::new();
        vm.insert(ids[0], v[..I * H].to_vec());
        vm.insert(ids[1], v[I * H..I * H + H].to_vec());
        vm.insert(ids[2], v[I * H + H..].to_vec());
        let hv = hvp::hvp(&gp, &inputs, &params, &vm, 1e-4, &seed).unwrap();
        let ours: Vec<f64> = ids.iter().flat_map(|id| hv[id].clone()).collect();
        let exact: Vec<f64> = (0..p).map(|i| (0..p).map(|j| hess[i * p + j] * v[j]).sum()).collect();
        let scale = exact.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = ours.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        eprintln!("trial {trial}: max |Hv - exact| {err:.2e} (max |Hv| {scale:.2e})");
        assert!(err <= 1e-7 * scale.max(1e-3), "trial {trial}: {err} vs scale {scale}");
    }
    // The Hessian is not Gauss-Newton only: its second-order part is non-zero here.
    assert!(hess.iter().any(|v| v.abs() > 1e-3));
}
