"""Where does float32 lose config b's teacher meta-gradient? One task, teacher only, f32 vs f64 per inner step."""
import sys
from pathlib import Path  # usage: python docs/benchmarks/float32-cpu-2026-12-04/inner_trajectory.py ALPHA [TASK] [--avgpool]
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
from torch.nn import functional as F
import outer_steps as tp
from tsmd_ray.algorithms import parameters_of
from tsmd_ray.algorithms.functional import cross_entropy
from tsmd_ray.algorithms.tsmd import query_logits
from tsmd_ray.models import use_fused_batchnorm
torch.set_num_threads(1)
args = [a for a in sys.argv[1:] if not a.startswith("--")]
alpha = float(args[0])
spec = tp.CONFIGS["b"]
dev = torch.device("cpu")
teacher, _ = tp.build_models(spec, dev, torch.float32)
use_fused_batchnorm(teacher, True)
if "--avgpool" in sys.argv:
    import types
    import tsmd_ray.models.resnet12 as r
    import torch.nn.functional as TF
    shim = types.SimpleNamespace(**{k: getattr(TF, k) for k in dir(TF) if not k.startswith("__")})
    shim.max_pool2d = lambda x, k, ceil_mode=False: TF.avg_pool2d(x, k, ceil_mode=ceil_mode)
    r.F = shim
    print("max-pool -> avg-pool")
b = tp.synthetic_batches(spec, dev, torch.float32, count=1)[0]
k = int(args[1]) if len(args) > 1 else 0
sx, sy, qx, qy = b.support_x[k], b.support_y[k], b.query_x[k], b.query_y[k]
runs = {}
for dtype in (torch.float64, torch.float32):
    t = teacher.to(dtype)
    p = {k: v.detach().clone().requires_grad_() for k, v in parameters_of(t).items()}
    traj = []
    for step in range(6):
        loss = cross_entropy(t, p, sx.to(dtype), sy)
        g = torch.autograd.grad(loss, list(p.values()), allow_unused=True, materialize_grads=True)
        ql = query_logits(t, p, sx.to(dtype), qx.to(dtype))
        qloss = F.cross_entropy(ql, qy)
        qg = torch.autograd.grad(qloss, list(p.values()), allow_unused=True, materialize_grads=True)
        traj.append(dict(loss=float(loss), gnorm=float(torch.cat([x.flatten() for x in g]).norm()),
                         qloss=float(qloss), qlogit_max=float(ql.abs().max()),
                         params=torch.cat([v.detach().flatten().double() for v in p.values()]),
                         qgrad=torch.cat([x.flatten().double() for x in qg])))
        p = {k: (v - alpha * gi).detach().requires_grad_() for (k, v), gi in zip(p.items(), g)}
    runs[dtype] = traj
print(f"alpha={alpha}: per inner step, f64 vs f32")
for i, (a, b_) in enumerate(zip(runs[torch.float64], runs[torch.float32])):
    dp = float((a["params"] - b_["params"]).norm() / a["params"].norm())
    dq = float((a["qgrad"] - b_["qgrad"]).norm() / a["qgrad"].norm())
    print(f" step {i}: support loss {a['loss']:.4g}/{b_['loss']:.4g} |grad| {a['gnorm']:.3g}/{b_['gnorm']:.3g} "
          f"query loss {a['qloss']:.4g}/{b_['qloss']:.4g} max|query logit| {a['qlogit_max']:.3g} "
          f"rel d(params) {dp:.2e} rel d(query grad) {dq:.2e}")
