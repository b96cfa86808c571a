"""Drop-in replacements for the FFT convolutions of the code bases people run today.

Each function or module here has its peer's exact signature and semantics (argument order,
defaults, FFT size and the wrap-around it implies, dtype rules) and runs on flashconv's
engines (flashconv.fftconv with its fused epilogue), so a model can switch by changing an
import:

=============================  =================================================================
flashconv.compat               the peer it mirrors
=============================  =================================================================
fftconv_ref                    HazyResearch/H3 ``src/ops/fftconv.py`` and HazyResearch/safari
                               ``src/ops/fftconv.py``: ``fftconv_ref(u, k, D, dropout_mask,
                               gelu=True, k_rev=None)``; safari's Hyena operator
                               (``src/models/sequence/hyena.py``) calls a three-argument
                               ``fftconv(u, k, D)``, which is ``fftconv_ref(u, k, D, None,
                               gelu=False)``
fftconv_func                   HazyResearch/H3 ``src/ops/fftconv.py``: ``fftconv_func``, the
                               autograd function over the fused ``fftconv_cuda`` extension
                               (csrc/fftconv), including H3's inner product q * conv(k v)
FlashFFTConv                   HazyResearch/flash-fft-conv ``flashfftconv/conv.py``:
                               ``FlashFFTConv(seqlen, dtype)``, ``forward(u, k, pregate=None,
                               postgate=None)``
=============================  =================================================================

What "the same semantics" means here (docs/compat.md has the details and the tests):

- FFT size and wrap-around. The peers multiply spectra at a fixed FFT size n and keep the first
  L outputs, so taps of k beyond n - L wrap around: fftconv_ref takes ``rfft(k, n=2L)`` (a k
  longer than L, as Hyena with blocks > 1 passes, contributes its taps L+1 ... 2L-1 as an
  anti-causal tail; taps >= 2L are dropped), fftconv_func ``n = max(2 * 2^ceil(log2 L), 16)``,
  FlashFFTConv ``n = seqlen`` (circular when seqlen == L). flashconv computes the same sums
  exactly: the wrapped taps become an anti-causal kernel (k_rev) and vice versa, and
  flashconv's own FFT is always large enough not to wrap again.
- dtypes. Output in u's dtype (float16 with force_fp16_output). The convolution and the
  epilogue (+ D u, GELU, dropout mask, q) are computed in float32 (float64 for float64 u) and
  rounded once; the peers compute in k's dtype (float32 in practice) too. fftconv_func's
  ``fftfp16`` (half-precision FFTs in H3's kernel) is accepted and ignored: flashconv's FFTs
  are float32, at least as accurate.
- Gradients flow to u, k, D, k_rev, v and q (and FlashFFTConv's gates); the dropout mask gets
  none (the peers' does not either).

torch tensors only (the peers are torch code); any device flashconv serves.
"""
import math

import torch

import flashconv

__all__ = ["fftconv_ref", "fftconv_func", "FlashFFTConv"]


def _wrapped(k, n, L):
    """The taps of k (H, Lk) that a circular convolution at FFT size n >= L sends around to
    the other side of a zero-padded row of L inputs: tail[:, j] = k[:, n - j] for j in
    [1, L - 1] (n - j < min(Lk, n)), an (H, L) kernel, or None when there are none.

    A tap s = n - j of the causal kernel reaches x[t - s + n] = x[t + j] for t + j < L: an
    anti-causal lag j; a tap of the anti-causal kernel likewise reaches the causal lag j. Both
    sides are disjoint from the unwrapped terms because n >= L."""
    lk = min(int(k.shape[-1]), n)
    lo = max(1, n - lk + 1)  # smallest j whose tap n - j exists
    if lo > L - 1:
        return None
    j = torch.arange(lo, L, device=k.device)
    tail = k.new_zeros((int(k.shape[0]), L))
    tail[:, lo:L] = k[:, n - j]
    return tail


def _kernels(k, k_rev, n, L):
    """(causal, anti-causal or None): k and k_rev as the peers' rfft(., n) products see them
    (first n taps, wrapped around at n), for flashconv.fftconv. k and k_rev unchanged when
    nothing wraps."""
    kw = _wrapped(k, n, L)
    krw = None if k_rev is None else _wrapped(k_rev, n, L)
    causal = k if krw is None else _add_taps(k[:, :L], krw)
    if k_rev is None:
        return causal, kw
    rev = k_rev if kw is None else _add_taps(k_rev[:, :L], kw)
    return causal, rev


def _add_taps(a, b):
    """a (H, <= L) + b (H, L), a zero-extended."""
    if a.shape[-1] < b.shape[-1]:
        a = torch.nn.functional.pad(a, (0, int(b.shape[-1] - a.shape[-1])))
    return a + b


def _check_u(who, u, dims=(3,)):
    if not isinstance(u, torch.Tensor):
        raise TypeError("%s: u must be a torch.Tensor, got %s" % (who, type(u).__name__))
    if u.ndim not in dims:
        raise ValueError("%s: u must have shape %s, got shape %s" % (
            who, " or ".join({3: "(B, H, L)", 4: "(B, H, N, L)"}[d] for d in dims),
            tuple(u.shape)))


def fftconv_ref(u, k, D, dropout_mask, gelu=True, k_rev=None):
    """H3's / safari's ``fftconv_ref`` (src/ops/fftconv.py), on flashconv's engines.

    ``out = dropout_mask * gelu(conv(u, k) + u * D)`` with the convolution that
    ``irfft(rfft(u, 2L) * (rfft(k, 2L) + conj(rfft(k_rev, 2L))))[..., :L]`` computes: k longer
    than L wraps around (its taps L+1 ... 2L-1 act as an anti-causal tail, taps >= 2L are
    dropped), as theirs does.

    Args:
        u: (B, H, L), or (B, H, N, L) as theirs accepts (k of channel h broadcast over N; D
            broadcast as theirs, ``u * D.unsqueeze(-1)``; that form computes D and GELU
            outside the fused op, and takes no dropout_mask).
        k: (H, Lk) kernel. D: (H,) (None: no skip term). k_rev: optional (H, Lk_rev).
        dropout_mask: (B, H) mask multiplied after GELU (theirs: ``F.dropout(ones(B, H), p)``,
            already scaled), or None. Required positional, as theirs.
        gelu: apply F.gelu (exact, erf form) to conv + D u.

    Returns:
        out in u's dtype, computed in float32 (float64 for float64 u) and rounded once.
    """
    _check_u("fftconv_ref", u, (3, 4))
    L = int(u.shape[-1])
    kc, kr = _kernels(k, k_rev, 2 * L, L)
    if u.ndim == 4:
        return _fftconv_ref_4d(u, kc, D, dropout_mask, gelu, kr)
    return flashconv.fftconv(u, kc, D, k_rev=kr, activation="gelu" if gelu else None,
                             dropout_mask=dropout_mask)


def _fftconv_ref_4d(u, k, D, dropout_mask, gelu, k_rev):
    """fftconv_ref's (B, H, N, L) form: k's spectrum (H, 1, n) broadcast over N, and
    ``u * D.unsqueeze(-1)`` broadcast as torch broadcasts it (D (H,) then pairs with N). The
    convolution runs on flashconv; the D term and GELU in float32 (float64) outside it."""
    if dropout_mask is not None:
        raise ValueError("fftconv_ref: a dropout_mask needs u of shape (B, H, L), got shape %s"
                         % (tuple(u.shape),))
    B, H, N, L = (int(s) for s in u.shape)
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    x = u.transpose(1, 2).reshape(B * N, H, L).to(cdt)
    y = flashconv.fftconv(x, k, k_rev=k_rev).view(B, N, H, L).transpose(1, 2)
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt).unsqueeze(-1)
    if gelu:
        y = torch.nn.functional.gelu(y)
    return y.to(u.dtype)


def _fft_size_func(L):
    """H3's fftconv_func FFT size: max(2 * 2^ceil(log2 L), 16)."""
    return max(2 * 2 ** int(math.ceil(math.log2(max(L, 1)))), 16)


def fftconv_func(u, k, D, dropout_mask, gelu=True, force_fp16_output=False,
                 output_hbl_layout=False, v=None, head_dim=1, q=None, fftfp16=False, k_rev=None):
    """H3's fused ``fftconv_func`` (src/ops/fftconv.py over csrc/fftconv), on flashconv.

    Without v and q: ``out = dropout_mask * gelu(conv(u, k) + D u)`` as fftconv_ref, with H3's
    FFT size n = max(2 * 2^ceil(log2 L), 16) for the wrap-around of long kernels.

    With v (and q): H3's inner product, as H3's fftconv reference for this op
    (``fftconv_h3_ref`` in H3's tests; u plays H3's k, k the SSM kernel):

        head_dim = 1:  out = q * (conv(u v, k) + D u v)          (gelu / dropout_mask between)
        head_dim = d:  u, v, q are (B, H d, L), channel h d + i; k, D are (H, .)
                       kv[b, i, j, h] = u[b, h d + i] v[b, h d + j]
                       out[b, h d + j] = sum_i q[b, h d + i] (conv(kv[b, i, j, h], k[h])
                                                              + D[h] kv[b, i, j, h])

    The output channel of head_dim > 1 is h d + j (h-major), which is the order of H3's
    fftconv_h3_ref and fused kernel; H3's slow path in src/models/ssm/h3.py rearranges
    'b d h l -> b (d h) l' (j-major) instead: permute when mixing the two. With head_dim > 1
    GELU applies to each conv(kv) before the q contraction, and dropout_mask is not
    supported (ValueError).

    Args:
        u: (B, H * head_dim, L). k: (H, Lk). D: (H,). dropout_mask: (B, H) or None.
        gelu: GELU after + D. force_fp16_output: return float16 (computed in float32,
            rounded once). output_hbl_layout: return (B, H, L) values stored in (H, B, L)
            order (strides of ``empty(H, B, L).transpose(0, 1)``), as H3's layout option.
        v, q: (B, H * head_dim, L) or None. head_dim: int >= 1 dividing u's channels.
        fftfp16: accepted for compatibility and ignored (H3: half-precision FFTs; flashconv's
            FFTs are float32). k_rev: optional (H, Lk_rev).

    Returns:
        out (B, H * head_dim, L) in u's dtype (float16 with force_fp16_output).
    """
    who = "fftconv_func"
    _check_u(who, u)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError("%s: head_dim must be an int >= 1, got %r" % (who, head_dim))
    B, C, L = (int(s) for s in u.shape)
    if C % head_dim:
        raise ValueError("%s: head_dim = %d must divide the channels of u (H * head_dim = %d)"
                         % (who, head_dim, C))
    if head_dim > 1 and (v is None or q is None):
        raise ValueError("%s: head_dim = %d needs v and q (the H3 inner product), got v=%s, "
                         "q=%s" % (who, head_dim, "None" if v is None else "a tensor",
                                   "None" if q is None else "a tensor"))
    for name, t in (("v", v), ("q", q)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, C, L)):
            raise ValueError("%s: %s must have u's shape %s, got %s" % (
                who, name, (B, C, L), tuple(t.shape) if isinstance(t, torch.Tensor) else
                type(t).__name__))
    n = _fft_size_func(L)
    kc, kr = _kernels(k, k_rev, n, L)
    act = "gelu" if gelu else None
    if head_dim == 1:
        y = flashconv.fftconv(u, kc, D, g_in=v, g_out=q, k_rev=kr, activation=act,
                              dropout_mask=dropout_mask)
    else:
        if dropout_mask is not None:
            raise ValueError("%s: dropout_mask is not supported with head_dim > 1 (got "
                             "head_dim = %d)" % (who, head_dim))
        H, d = C // head_dim, head_dim
        cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        # kv (B, d1, d2, H, L) in the compute dtype, seen as (B d1 d2, H, L) rows.
        uu = u.to(cdt).view(B, H, d, 1, L).permute(0, 2, 3, 1, 4)
        vv = v.to(cdt).view(B, H, 1, d, L).permute(0, 2, 3, 1, 4)
        kv = (uu * vv).reshape(B * d * d, H, L)
        z = flashconv.fftconv(kv, kc, D, k_rev=kr, activation=act).view(B, d, d, H, L)
        qq = q.to(cdt).view(B, H, d, L).permute(0, 2, 1, 3).unsqueeze(2)  # (B, d1, 1, H, L)
        y = (z * qq).sum(1)  # (B, d2, H, L)
        y = y.permute(0, 2, 1, 3).reshape(B, C, L).to(u.dtype)  # channel h d + j
    if force_fp16_output:
        y = y.to(torch.float16)
    if output_hbl_layout:
        y = y.transpose(0, 1).contiguous().transpose(0, 1)
    return y


class FlashFFTConv(torch.nn.Module):
    """flash-fft-conv's ``FlashFFTConv`` (flashfftconv/conv.py), on flashconv's engines.

    ``FlashFFTConv(seqlen, dtype)``: seqlen is the FFT size (theirs: a power of two, 256 ...
    4M). ``forward(u, k, pregate=None, postgate=None)`` computes
    ``postgate * irfft(rfft(u * pregate, seqlen) * rfft(k, seqlen), seqlen)[..., :L]`` for
    u (B, H, L) with L <= seqlen and k (H, Lk): a causal convolution when L + Lk - 1 <=
    seqlen (theirs: seqlen = 2L), circular when seqlen == L (taps reaching past seqlen wrap
    around), as theirs. No D term (theirs has none: add ``u * D[:, None]``).

    dtype: recorded as theirs records it (their kernels run in it); flashconv computes in
    float32 (float64 for float64 u) and returns u's dtype. seqlen need not be a power of two
    here. The module has no parameters or buffers.
    """

    def __init__(self, seqlen, dtype=torch.bfloat16, use_32_butterfly=True):
        super().__init__()
        if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
            raise ValueError("FlashFFTConv: seqlen (the FFT size) must be a positive int, got %r"
                             % (seqlen,))
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError("FlashFFTConv: dtype must be a torch floating dtype (theirs: "
                            "torch.bfloat16 or torch.float16), got %r" % (dtype,))
        self.seqlen = seqlen
        self.dtype = dtype
        self.use_32_butterfly = use_32_butterfly

    def extra_repr(self):
        return "seqlen=%d, dtype=%s" % (self.seqlen, self.dtype)

    def forward(self, u, k, pregate=None, postgate=None):
        _check_u("FlashFFTConv", u)
        L = int(u.shape[-1])
        if L > self.seqlen:
            raise ValueError("FlashFFTConv: u has L = %d samples, more than seqlen = %d (the FFT "
                             "size): make seqlen >= L (2 L for a causal convolution)"
                             % (L, self.seqlen))
        kc, kr = _kernels(k, None, self.seqlen, L)
        return flashconv.fftconv(u, kc, g_in=pregate, g_out=postgate, k_rev=kr)
