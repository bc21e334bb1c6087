import subprocess, sys, statistics, re, os
# ab.py N REPS ROUNDS "label:env:binary:mode" ...
n, reps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
cases = [c.split(':') for c in sys.argv[4:]]
res = {c[0]: [] for c in cases}
for r in range(rounds):
    for label, env, binary, mode in cases:
        e = dict(os.environ)
        for kv in filter(None, env.split(',')):
            k, v = kv.split('='); e[k] = v
        out = subprocess.run([binary, n, reps, mode], capture_output=True, text=True, env=e).stdout
        res[label].append(float(re.search(r'best (\d+) Melem', out.split('\n')[-2]).group(1)))
for label, v in res.items():
    print(f"{label:14s} median {statistics.median(v):6.0f}  max {max(v):6.0f}  min {min(v):6.0f} Melem/s")
