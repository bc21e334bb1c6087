/* C harness of Adam's fused int8 loop: mk.sh REV NAME extracts the C sections of
   src/kernels/_storage.pxi and adam.pxi (of git revision REV, or "work") into codes_NAME.h
   and builds this file against them with the avx512 flags (paths: /tmp/i8); usage:
   NAME N REPS [near|stoch|f32|stream], PF=1 for the large-call prefetch; ab.py alternates binaries. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>
#include "codes.h"
static double now(void){struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+1e-9*t.tv_nsec;}
__attribute__((noinline)) static void f32_adam(float *p, const float *g, float *m, float *v, ptrdiff_t n, fd_adam_floats f) {
  __m512 w1=_mm512_set1_ps(f.w1), k2=_mm512_set1_ps(f.keep2), w2=_mm512_set1_ps(f.w2), st=_mm512_set1_ps(f.step_size), ib=_mm512_set1_ps(f.inv_bc2_sqrt), ep=_mm512_set1_ps(f.eps), sc=_mm512_set1_ps(f.scale);
  for (ptrdiff_t i=0;i<n;i+=16){ __m512 x=_mm512_loadu_ps(p+i), d=_mm512_mul_ps(sc,_mm512_loadu_ps(g+i)), mean=_mm512_loadu_ps(m+i), sq=_mm512_loadu_ps(v+i);
    mean=_mm512_add_ps(mean,_mm512_mul_ps(w1,_mm512_sub_ps(d,mean))); sq=_mm512_add_ps(_mm512_mul_ps(k2,sq),_mm512_mul_ps(_mm512_mul_ps(w2,d),d));
    _mm512_storeu_ps(m+i,mean); _mm512_storeu_ps(v+i,sq);
    _mm512_storeu_ps(p+i,_mm512_sub_ps(x,_mm512_div_ps(_mm512_mul_ps(st,mean),_mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(sq),ib),ep))));}
}
__attribute__((noinline)) static void stream16(float *p, const float *g, uint8_t *m, uint8_t *v, ptrdiff_t n) {
  for (ptrdiff_t i=0;i<n;i+=64){ for(int j=0;j<64;j+=16){ _mm512_storeu_ps(p+i+j,_mm512_add_ps(_mm512_loadu_ps(p+i+j),_mm512_loadu_ps(g+i+j))); }
    __m512i a=_mm512_loadu_si512(m+i), b=_mm512_loadu_si512(v+i); _mm512_storeu_si512(m+i,_mm512_xor_si512(a,b)); _mm512_storeu_si512(v+i,_mm512_add_epi8(a,b)); }
}
int main(int argc,char**argv){
  int n = argc>1?atoi(argv[1]):65536; int reps = argc>2?atoi(argv[2]):2000; int stoch = argc>3 && !strcmp(argv[3],"stoch"); int f32 = argc>3 && !strcmp(argv[3],"f32"); int st = argc>3 && !strcmp(argv[3],"stream"); int what = argc>4 ? atoi(argv[4]) : 0;
  float *p=aligned_alloc(64,n*4),*g=aligned_alloc(64,n*4); uint8_t*m=aligned_alloc(64,n),*v=aligned_alloc(64,n);
  float *fm=aligned_alloc(64,n*4),*fv=aligned_alloc(64,n*4);
  float *sm=calloc(n/256+1,4),*sv=calloc(n/256+1,4);
  srand(1);
  for(int i=0;i<n;i++){p[i]=(rand()/(float)RAND_MAX-0.5f); g[i]=(rand()/(float)RAND_MAX-0.5f)*0.01f; m[i]=0; v[i]=0; fm[i]=0; fv[i]=0;}
  volatile float one=1.0f;
  fd_adam_floats f={0.001f,one,1e-8f,one,0.f,one,0.1f,0.9f,0.999f,0.001f,0,0,0};
  fd_random r1=fd_random_run(stoch,12345,0), r2=fd_random_run(stoch,999,0);
  double best=1e9;
  int rounds = reps < 200 ? reps : 200; for(int k=0;k<rounds;k++){ double t=now(); for(int j=0;j<reps/rounds;j++) { if (st) stream16(p,g,m,v,n); else if (f32) f32_adam(p,g,fm,fv,n,f); else fd_adam_codes(p,g,m,v,sm,sv,n,f,r1,r2,getenv("PF")!=NULL);} t=(now()-t)/(reps/rounds); if(t<best)best=t;}
  { int pd=0; for(int b=0;b<n/256;b++) pd += fd_v_plain_code_pair(m+b*256,v+b*256,256,sm[b],sv[b]);
    printf("plain-decode blocks %d of %d; scale m %g v %g\n", pd, n/256, sm[0], sv[0]); }
  printf("%s n %d: best %.0f Melem/s  (%.3f ns/elem)\n", st?"stream 16B":f32?"f32":stoch?"int8 stochastic":"int8 nearest", n, n/best/1e6, best/n*1e9);
  return 0;
}
