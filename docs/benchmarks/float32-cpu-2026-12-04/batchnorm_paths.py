"""Float32 accuracy of the loop path: fused vs primitive batch norm, and the vmap path (spec a and b)."""
import sys, dataclasses
from pathlib import Path  # usage: python docs/benchmarks/float32-cpu-2026-12-04/batchnorm_paths.py a|b ALPHA
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch
import outer_steps as tp
from tsmd_ray.models import use_fused_batchnorm
torch.set_num_threads(1)
dev = torch.device("cpu")
name = sys.argv[1]; alpha = float(sys.argv[2])
spec = dataclasses.replace(tp.CONFIGS[name], meta_batch=2, alpha=alpha, lam=alpha)
def grads(dtype, vmap, fused=True):
    teacher, student = tp.build_models(spec, dev, dtype)
    batch = tp.synthetic_batches(spec, dev, dtype, count=1)[0]
    path = tp.EnginePath(spec, teacher, student, vmap)
    if not vmap and not fused:
        for m in (path.teacher, path.student):
            if m is not None: use_fused_batchnorm(m, False)
    g = path.gradients(batch)
    return {k: {n: t.double() for n, t in v.items()} for k, v in g.items() if v}
def rel(g, r):
    flat = lambda d: torch.cat([t.flatten() for t in d.values()])
    return {k: f"{float((flat(g[k]) - flat(r[k])).norm() / flat(r[k]).norm()):.2e}" for k in r}
ref = grads(torch.float64, False)
print(name, "alpha", alpha, "vs float64 loop:")
print("  f64 loop primitive BN:", rel(grads(torch.float64, False, False), ref))
print("  f32 loop fused BN    :", rel(grads(torch.float32, False), ref))
print("  f32 loop primitive BN:", rel(grads(torch.float32, False, False), ref))
print("  f32 vmap (primitive) :", rel(grads(torch.float32, True), ref), flush=True)
