"""The one-pass fold as one loop per logit row, in C: every reduction of a block of logits in a single read.

`tvkd.cache.onepass` folds a block of logits [R, Vb] into running per-state accumulators with about
fifty torch operations; each one reads the block again (on one CPU thread they cost about as much as
the LM head's matmul: see its module docstring), and a plain `torch.topk` would cost more than the
matmul (~14 ns a logit against ~8). This module does the same fold row by row while the row is in
the L1 cache:

1. the row's block max, then the online-softmax rescaling of every running sum (scalar);
2. the logits above the smallest value τ of the running top-K (few after the first block: about
   K·ln(V/K) of a row's V; chunks of 64 with none are skipped in one vector compare) go through a
   min-heap of the K largest; a logit of an earlier block pushed out of it joins the rest mass R;
3. one vectorised loop: e = exp(z − M) (from exp((z − M)/2)² when β_V = 2 is asked, as the torch
   fold), S_1 += e, W += e·z, and R += e where z is below the heap's new τ (every logit of the
   block outside the heap is below τ, or equal to it: those ties are counted and added), so R
   stays a sum of positive terms (docs/methods.md §B.8), as in the torch fold; one more loop per
   other β_V.

Same arithmetic as the torch fold in fp32 (the summation order differs: equal to 1e-5, tested in
tests/test_cache_onepass.py against the full-logits path). The exponential is a polynomial (Cody-Waite
range reduction, degree-7 Taylor on |r| ≤ ln2/2: relative error ~1e-7) because libm's `expf` does not
vectorise without -ffast-math, whose finite-math assumption breaks the −inf sentinels used here.

The source is compiled on first use with the system C compiler (``$CC``, else cc/gcc/clang) into
``$TVKD_CACHE/kernels`` (keyed by the source, the flags and the CPU), loaded with ctypes (no torch
headers, so it builds in about a second) and called with the GIL released, the rows of a block split
over `torch.get_num_threads()` OpenMP threads (torch's own runtime, see FLAGS). Without a compiler,
or with ``TVKD_CACHE_KERNEL=0``, `available()` is False and the one pass runs its pure-torch fold:
the tested reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CH 256

/* exp(x) for x <= 0 (z - M): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Taylor to r^7;
   0 below -87 (exp < 1.7e-38: nothing a fp32 sum of terms >= 1 can hold). Plain arithmetic, so the
   compiler vectorises the loops that call it. */
static inline float fexp(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    float y = p * two_n;
    return x < -87.0f ? 0.0f : y;
}

/* fexp over an array (its accuracy is tested) */
void tvkd_exp(const float *x, float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = fexp(x[i]);
}

static void heap_down(float *hv, int64_t *hi, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, s = i;
        if (l < k && hv[l] < hv[s]) s = l;
        if (r < k && hv[r] < hv[s]) s = r;
        if (s == i) return;
        float tv = hv[i]; hv[i] = hv[s]; hv[s] = tv;
        int64_t ti = hi[i]; hi[i] = hi[s]; hi[s] = ti;
        i = s;
    }
}

static void heap_up(float *hv, int64_t *hi, int64_t i) {
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!(hv[i] < hv[p])) return;
        float tv = hv[i]; hv[i] = hv[p]; hv[p] = tv;
        int64_t ti = hi[i]; hi[i] = hi[p]; hi[p] = ti;
        i = p;
    }
}

/* Fold rows [r0, r1) of a block of logits z (row stride ld, vb columns, vocabulary offset v0) into the
   running state of those rows: max m, S_1 s1, W w (want_w), S_beta sb[b*n_rows + r] for each inverse
   temperature ib[b] (b == half: exp(z-M) is taken as its square), the taken logit (ids, taken; may be
   NULL), the min-heap (hv, hi: k per row; hn: its fill) and the rest mass (may be NULL). */
void tvkd_fold(const float *z, int64_t r0, int64_t r1, int64_t ld, int64_t vb, int64_t v0, int64_t n_rows,
               float *m, float *s1, float *w, int64_t want_w, const float *ib, float *sb, int64_t nb,
               int64_t half, const int64_t *ids, float *taken, float *hv_all, int64_t *hi_all, int64_t *hn,
               int64_t k, float *rest, int64_t threads) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads) if (threads > 1)
    for (int64_t r = r0; r < r1; ++r) {
        const float *zr = z + r * ld;
        float bm = -INFINITY;
#pragma omp simd reduction(max:bm)
        for (int64_t j = 0; j < vb; ++j) bm = zr[j] > bm ? zr[j] : bm;
        float mo = m[r];
        float mn = mo > bm ? mo : bm;
        float sc = mo == -INFINITY ? 0.0f : expf(mo - mn);
        float *hv = hv_all + r * k;
        int64_t *hi = hi_all + r * k;
        int64_t n = hn[r];
        double ar = 0.0;
        /* the heap of the k largest first (raw logits, a chunk of 64 skipped when none beats the heap's
           minimum); a logit of an earlier block that leaves the heap goes into the rest here */
        if (n < k || bm > hv[0]) {
            for (int64_t j0 = 0; j0 < vb; j0 += 64) {
                int64_t j1 = j0 + 64 < vb ? j0 + 64 : vb;
                float cur = n == k ? hv[0] : -INFINITY;
                int any = 0;
#pragma omp simd reduction(|:any)
                for (int64_t j = j0; j < j1; ++j) any |= zr[j] > cur;
                if (!any) continue;
                for (int64_t j = j0; j < j1; ++j) {
                    float x = zr[j];
                    if (n < k) {
                        hv[n] = x; hi[n] = v0 + j; heap_up(hv, hi, n); ++n;
                    } else if (x > hv[0]) {
                        if (hi[0] < v0) ar += fexp(hv[0] - mn);
                        hv[0] = x; hi[0] = v0 + j; heap_down(hv, hi, k, 0);
                    }
                }
            }
            hn[r] = n;
        }
        /* every logit of this block outside the heap is below its minimum thr, or equal to it (a tie) */
        float thr = n == k ? hv[0] : -INFINITY;
        /* fp32 sums over chunks of CH logits (CH / 16 terms a vector lane), the chunks' sums in fp64 */
        double a1 = 0.0, aw = 0.0, ah = 0.0, aeq = 0.0;
        for (int64_t j0 = 0; j0 < vb; j0 += CH) {
            int64_t j1 = j0 + CH < vb ? j0 + CH : vb;
            float c1 = 0.0f, cw = 0.0f, cr = 0.0f, chh = 0.0f, ceq = 0.0f;
            if (half >= 0) {
#pragma omp simd reduction(+:c1,cw,cr,chh,ceq)
                for (int64_t j = j0; j < j1; ++j) {
                    float x = zr[j];
                    float e2 = fexp(0.5f * (x - mn));
                    float e = e2 * e2;
                    chh += e2; c1 += e; cw += e * x; cr += x < thr ? e : 0.0f; ceq += x == thr ? 1.0f : 0.0f;
                }
            } else {
#pragma omp simd reduction(+:c1,cw,cr,ceq)
                for (int64_t j = j0; j < j1; ++j) {
                    float x = zr[j];
                    float e = fexp(x - mn);
                    c1 += e; cw += e * x; cr += x < thr ? e : 0.0f; ceq += x == thr ? 1.0f : 0.0f;
                }
            }
            a1 += c1; aw += cw; ar += cr; ah += chh; aeq += ceq;
        }
        if (aeq > 0.0) { /* the ties at thr that are not in the heap */
            for (int64_t i = 0; i < n; ++i) aeq -= (hi[i] >= v0 && hv[i] == thr) ? 1.0 : 0.0;
            ar += aeq * fexp(thr - mn);
        }
        s1[r] = (float)(s1[r] * sc + a1);
        if (want_w) w[r] = (float)(w[r] * sc + aw);
        for (int64_t b = 0; b < nb; ++b) {
            float *sr = sb + b * n_rows + r;
            float scb = mo == -INFINITY ? 0.0f : expf((mo - mn) * ib[b]);
            if (b == half) { *sr = (float)(*sr * scb + ah); continue; }
            double ab = 0.0;
            float ibb = ib[b];
            for (int64_t j0 = 0; j0 < vb; j0 += CH) {
                int64_t j1 = j0 + CH < vb ? j0 + CH : vb;
                float cb = 0.0f;
#pragma omp simd reduction(+:cb)
                for (int64_t j = j0; j < j1; ++j) cb += fexp((zr[j] - mn) * ibb);
                ab += cb;
            }
            *sr = (float)(*sr * scb + ab);
        }
        if (ids) {
            int64_t a = ids[r] - v0;
            if (a >= 0 && a < vb) taken[r] = zr[a];
        }
        if (rest) rest[r] = (float)(rest[r] * sc + ar);
        m[r] = mn;
    }
}
"""

# -fno-trapping-math: lets floorf vectorise (no FP exception is ever read); no -ffast-math (see above).
# -fopenmp: the rows of a block split over threads; torch has loaded its libgomp.so.1 already, so the
# loader resolves this library's libgomp.so.1 to it: one OpenMP runtime and one thread team in the
# process. Where -fopenmp does not build, the same source without it (one thread).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
PARALLEL = (("-fopenmp",), ("-fopenmp-simd",))
_LIB: list[ctypes.CDLL | None] = []  # [the loaded library, or None], once per process


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu() -> str:
    """What the code is compiled for (-march=native): the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _compile(cc: str, lib: Path) -> None:
    """Compile SOURCE into `lib` (with OpenMP where the compiler has it); raises when no flag set builds."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as d:
        src, tmp = Path(d) / "fold.c", Path(d) / "fold.so"
        src.write_text(SOURCE)
        for extra in PARALLEL:
            proc = subprocess.run([cc, *FLAGS, *extra, str(src), "-o", str(tmp), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if not proc.returncode:
                os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
                return
        raise subprocess.SubprocessError(proc.stderr[-500:])


def _build() -> ctypes.CDLL | None:
    from tvkd.paths import cache_root

    cc = _compiler()
    if cc is None:
        log.info("one-pass kernel: no C compiler found; the pure-torch fold runs")
        return None
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, *map(str, PARALLEL), _cpu(), platform.machine()]).encode())
    lib = cache_root() / "kernels" / f"tvkd_fold-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        try:
            _compile(cc, lib)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("one-pass kernel: %s could not build %s (%s); the pure-torch fold runs", cc, lib, e)
            return None
    try:
        so = ctypes.CDLL(str(lib))
    except OSError as e:
        log.warning("one-pass kernel: cannot load %s (%s); the pure-torch fold runs", lib, e)
        return None
    fn = so.tvkd_fold
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr,
                   ptr, i64, ptr, i64]
    fn.restype = None
    so.tvkd_exp.argtypes = [ptr, ptr, i64]
    so.tvkd_exp.restype = None
    return so


def available() -> bool:
    """Whether the compiled fold can run here (``TVKD_CACHE_KERNEL=0`` turns it off)."""
    if os.environ.get("TVKD_CACHE_KERNEL", "1") == "0":
        return False
    if not _LIB:
        _LIB.append(_build())
    return _LIB[0] is not None


def exp(x: torch.Tensor) -> torch.Tensor:
    """The fold's exponential over an fp32 CPU tensor (for its accuracy test)."""
    if not available():
        raise RuntimeError("the compiled fold is not available here")
    x = x.detach().float().contiguous()
    y = torch.empty_like(x)
    _LIB[0].tvkd_exp(x.data_ptr(), y.data_ptr(), x.numel())
    return y



def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FoldState:
    """The running per-row accumulators of one chunk of rows (CPU, fp32, contiguous)."""

    def __init__(self, rows: int, k: int, betas: tuple[float, ...], want_w: bool, want_a: bool, want_rest: bool):
        f32 = dict(dtype=torch.float32)
        self.rows, self.k, self.want_w = rows, k, want_w
        self.m = torch.full((rows,), float("-inf"), **f32)
        self.s1, self.w = torch.zeros(rows, **f32), torch.zeros(rows, **f32)
        self.ib = torch.tensor([1.0 / b for b in betas], **f32)
        self.sb = torch.zeros(len(betas), rows, **f32)
        self.half = betas.index(2.0) if 2.0 in betas else -1
        self.taken = torch.zeros(rows, **f32) if want_a else None
        self.hv = torch.full((rows, k), float("-inf"), **f32)
        self.hi = torch.zeros((rows, k), dtype=torch.long)
        self.hn = torch.zeros(rows, dtype=torch.long)
        self.rest = torch.zeros(rows, **f32) if want_rest else None

    def fold(self, zb: torch.Tensor, v0: int, ids: torch.Tensor | None) -> None:
        """Fold the block zb [rows, Vb] (fp32 CPU, unit column stride) at vocabulary offset v0."""
        if zb.dtype != torch.float32 or zb.device.type != "cpu" or zb.stride(1) != 1 or zb.shape[0] != self.rows:
            raise ValueError("the compiled fold takes an fp32 CPU block [rows, Vb] with contiguous rows")
        r, vb = zb.shape
        threads = max(1, min(torch.get_num_threads(), r // 16))
        _LIB[0].tvkd_fold(zb.data_ptr(), 0, r, zb.stride(0), vb, v0, r, self.m.data_ptr(), self.s1.data_ptr(),
                          self.w.data_ptr(), int(self.want_w), self.ib.data_ptr(), self.sb.data_ptr(), len(self.ib),
                          self.half, _ptr(ids), _ptr(self.taken), self.hv.data_ptr(), self.hi.data_ptr(),
                          self.hn.data_ptr(), self.k, _ptr(self.rest), threads)

    def top(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K largest logits of each row, largest first, and their ids."""
        v, order = self.hv.sort(dim=-1, descending=True, stable=True)
        return v, self.hi.gather(1, order)
