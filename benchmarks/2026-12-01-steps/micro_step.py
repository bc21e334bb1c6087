"""timeit of one step, many short repeats: median, p10, min (microseconds)."""
import sys, os, timeit, statistics, itertools, json
import numpy as np, fastdescent as fd
import torch
torch.set_num_threads(1)
rng=np.random.default_rng(0); n=1000
p=rng.standard_normal(n).astype(np.float32); g=(0.1*rng.standard_normal(n)).astype(np.float32)
m=np.zeros(n,np.float32); v=np.zeros(n,np.float32)
steps=itertools.count(10)
face=lambda: fd.adam_step(p,g,m,v,step=next(steps),n_threads=1)
opt=fd.Adam([p.copy()], n_threads=1); gl=[g]
optimizer=lambda: opt.step(gl)
flat=fd.Adam([p.copy()], n_threads=1, flat=True); flat.grads[0][...]=g
tp=torch.from_numpy(p.copy()); tp.grad=torch.from_numpy(g.copy())
to=torch.optim.Adam([tp], fused=True)
out={"load_start": os.getloadavg()}
for name, stmt, number in [("fd.adam_step", face, 500), ("fd.Adam.step", optimizer, 500), ("fd.Adam(flat).step", flat.step, 500), ("torch fused", to.step, 50)]:
    stmt(); stmt()
    ts=sorted(t/number*1e6 for t in timeit.repeat(stmt, number=number, repeat=400))
    out[name]=(statistics.median(ts), ts[len(ts)//10], ts[0])
    print(f"{name:20s} median {out[name][0]:.2f}  p10 {out[name][1]:.2f}  min {out[name][2]:.2f} us", flush=True)
out["load_end"]=os.getloadavg()
print("load", out["load_start"], out["load_end"])
print("ratios (torch fused / fd), median:", {k: round(out['torch fused'][0]/out[k][0],1) for k in ("fd.adam_step","fd.Adam.step","fd.Adam(flat).step")},
      "p10:", {k: round(out['torch fused'][1]/out[k][1],1) for k in ("fd.adam_step","fd.Adam.step","fd.Adam(flat).step")})
