import re, subprocess, sys
def loops(binary):
    lines = subprocess.run(['objdump','-d','--no-show-raw-insn',binary],capture_output=True,text=True).stdout.split('\n')
    addr=lambda l: int(l.split(':')[0],16) if re.match(r'\s+[0-9a-f]+:',l) else None
    idx={addr(l):k for k,l in enumerate(lines) if addr(l) is not None}
    out=[]
    for k,l in enumerate(lines):
        m=re.search(r'\tj\w+\s+([0-9a-f]+) <',l)
        if m:
            t=int(m.group(1),16); a=addr(l)
            if t<a and t in idx:
                body=[x.split('\t')[-1] for x in lines[idx[t]:k+1]]
                nd=sum('vdivps' in x for x in body)
                if nd==4 and len(body)<400:
                    ops=[x.split()[0] for x in body if x.strip()]
                    vec=[o for o in ops if o.startswith('v') or o.startswith('k')]
                    mem_only=[o for o,x in zip(ops,body) if o in ('vmovaps','vmovups','vmovdqa32','vmovdqa64','vmovdqu8','vmovdqu32','vmovdqu64')]
                    out.append((hex(t), len(body), len(vec), len(vec)-len(mem_only), sum('vpack' in o for o in ops)))
    return out
for b in sys.argv[1:]:
    print(b, 'loops with 4 divides (start, instrs, vector, vector non-move, packs):', loops(b))
