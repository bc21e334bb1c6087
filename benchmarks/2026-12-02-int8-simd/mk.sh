#!/bin/bash
# mk.sh REV NAME: build the harness from the kernels of git revision REV (or "work") as binary NAME
set -e
cd /tmp/i8
if [ "$1" = work ]; then s=/work/wt/int8-simd/src/kernels/_storage.pxi; a=/work/wt/int8-simd/src/kernels/adam.pxi
else git -C /work/wt/int8-simd show $1:src/kernels/_storage.pxi > /tmp/i8/s_$2.pxi; git -C /work/wt/int8-simd show $1:src/kernels/adam.pxi > /tmp/i8/a_$2.pxi; s=/tmp/i8/s_$2.pxi; a=/tmp/i8/a_$2.pxi; fi
python3 - "$s" "$a" "$2" <<'PY'
import re,sys
out=[]
for p in sys.argv[1:3]:
    s=open(p).read()
    for m in re.finditer(r'cdef extern from \*:\n    """\n(.*?)\n    """', s, re.S):
        out.append(m.group(1))
open(f'/tmp/i8/codes_{sys.argv[3]}.h','w').write('\n'.join(out))
h=open('/tmp/i8/harness.c').read().replace('#include "codes.h"', f'#include "codes_{sys.argv[3]}.h"')
if 'fd_v_plain_code_pair' not in open(f'/tmp/i8/codes_{sys.argv[3]}.h').read():
    h=h.replace('pd += fd_v_plain_code_pair(m+b*256,v+b*256,256,sm[b],sv[b]);','pd += fd_v_plain_codes(m+b*256,256,sm[b],1,0x1p112f) && fd_v_plain_codes(v+b*256,256,sv[b],0,0x1p96f);')
open(f'/tmp/i8/h_{sys.argv[3]}.c','w').write(h)
PY
gcc -O3 -fno-math-errno -ffp-contract=off -march=x86-64-v4 -mprefer-vector-width=512 h_$2.c -o $2 -lm
