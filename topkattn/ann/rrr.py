"""Per-cluster reduced-rank regression (the LoRANN score model).

Shape letters (the ANN index's own): Qt training queries, N points of the cluster, Dx data
dim, Dg reduced (global) dim, Rk rank.

For a cluster with points P (N, Dx) and reduced training queries X (Qt, Dg), the
targets are the inner products Y = Q P^T (Qt, N).  The OLS coefficient beta (Dg, N)
is P T (approximate mode, exact when T is square) or the least-squares solution
of X beta = Y.  Reduced-rank regression keeps the fitted values' top-Rk right
singular vectors V (N, Rk): W = beta V V^T, factored as A = beta V (Dg, Rk) and
B = V^T (Rk, N), so a reduced query x scores every point at once as (x A) B.

The right singular vectors of Y_hat = X beta are those of M = F beta (Dg, N), where
F^T F = X^T X: only the (Dg, Dg) Gram of the training queries is needed, never the
(Qt, N) matrix Y_hat.  Their left partners are the top eigenvectors U of the (Dg, Dg)
matrix M M^T = F (beta beta^T) F^T, so a cluster costs one (Dg, Dg) Gram of beta,
O(N Dg^2), two (Dg, Dg) products and an eigenproblem for Rk vectors.
"""
import numpy as np

# above this many dims, the top-Rk eigenvectors come from subspace iteration (a full
# eigendecomposition of a (288, 288) matrix costs ~10 ms, the iteration ~1 ms)
SUBSPACE_MIN_DIM = 96
SUBSPACE_OVERSAMPLE = 16
SUBSPACE_ROUNDS = 3  # each: two products with the matrix, then one orthonormalisation
_SUBSPACE_SEED = 0x10A7


def gram_sqrt(gram: np.ndarray) -> np.ndarray:
    """Return F (Dg, Dg) with F^T F = gram (symmetric PSD): the Cholesky factor L^T (10x
    cheaper than an eigendecomposition), or sqrt(w) U^T from one when gram is singular."""
    gram = np.asarray(gram, np.float64)
    try:
        return np.linalg.cholesky(gram).T
    except np.linalg.LinAlgError:  # not positive definite (fewer queries than dimensions)
        w, u = np.linalg.eigh(gram)
        w = np.clip(w, 0.0, None)
        return np.sqrt(w)[:, None] * u.T


def top_eigh(sym: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The r largest eigenvalues (descending, (r,)) and eigenvectors (Dg, r) of the symmetric
    PSD matrix ``sym`` (Dg, Dg), float64.

    Small matrices (Dg < SUBSPACE_MIN_DIM, or r close to Dg) take a full ``eigh``.  Larger
    ones take block subspace iteration from a fixed random start (deterministic: the same
    matrix always gives the same vectors) with SUBSPACE_OVERSAMPLE extra columns (SUBSPACE_ROUNDS rounds of G^2), then a
    Rayleigh-Ritz step; eigenvectors of well-separated eigenvalues match ``eigh``'s, and
    in a flat part of the spectrum any basis of nearly the same captured energy results.
    """
    sym = np.asarray(sym, np.float64)
    g = sym.shape[0]
    r = min(r, g)
    width = r + SUBSPACE_OVERSAMPLE
    if g < SUBSPACE_MIN_DIM or 2 * width >= g:
        w, u = np.linalg.eigh(sym)
        return w[::-1][:r], u[:, ::-1][:, :r]
    start = np.random.default_rng(_SUBSPACE_SEED).standard_normal((g, width))
    basis = np.linalg.qr(sym @ start)[0]  # (Dg, width)
    for _ in range(SUBSPACE_ROUNDS):
        basis = np.linalg.qr(sym @ (sym @ basis))[0]
    small = basis.T @ sym @ basis  # (width, width) Rayleigh quotient
    w, v = np.linalg.eigh((small + small.T) / 2)
    w, v = w[::-1][:r], v[:, ::-1][:, :r]
    return w, basis @ v


def _pow2_scale(x: np.ndarray) -> float:
    """A power of two c with max|c x| in [0.5, 1) (1.0 for an empty or all-zero x): an exact rescaling."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return 1.0 if not top or not np.isfinite(top) else float(2.0 ** -np.frexp(top)[1])


def fit_cluster(beta: np.ndarray, gram: np.ndarray, rank: int,
                factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit the rank-``rank`` model of one cluster.

    beta: (Dg, N) OLS coefficients; gram: (Dg, Dg) Gram of the reduced training queries;
    factor: gram_sqrt(gram) if already known.
    Returns ``(A, Bt, P)``: A (Dg, Rk) float64, Bt = B^T (N, Rk) float64, and
    P (Rk, Dg), the map that places a point with OLS column b as ``P b``: the column
    minimising the squared score error over the training queries given A,
    P = (A^T Gram A)^-1 A^T Gram.  Every point's column of B is placed so (Bt = (P beta)^T),
    which for exact singular vectors is V itself, so a point added later gets exactly the
    column it would have had in the fit.  Columns past the numerical rank of the fitted
    values (at most min(rank, Dg, N)) are zero.

    With U the top eigenvectors of M M^T = F (beta beta^T) F^T (M = F beta, F^T F = Gram)
    and s their singular values, V = M^T U / s and A = beta V = (beta beta^T) F^T U / s:
    nothing but the (Dg, Dg) Gram of beta and the final placement touches the N points.
    """
    beta = np.asarray(beta)
    if beta.dtype not in (np.float32, np.float64):
        beta = beta.astype(np.float64)
    g, n = beta.shape
    gram = np.asarray(gram, np.float64)
    f = gram_sqrt(gram) if factor is None else np.asarray(factor, np.float64)
    # the (Dg, Dg) products run in beta's dtype (float32 for the index: 2x faster, and the
    # placement P below is solved in float64 from whatever A results, so it stays exact), on
    # beta and F scaled by powers of two (exact) to about 1, so that large data (|x| ~ 1e9)
    # cannot overflow float32: bb, mm and the eigenvalues are those of the scaled factors
    cb, cf = _pow2_scale(beta), _pow2_scale(f)
    beta_s = beta * beta.dtype.type(cb) if cb != 1.0 else beta
    bb = beta_s @ beta_s.T  # (Dg, Dg) = cb^2 beta beta^T, the O(N Dg^2) step
    fc = (f * cf).astype(beta.dtype)
    mm = (fc @ bb @ fc.T).astype(np.float64)  # (Dg, Dg) = (cb cf)^2 M M^T
    keep = min(rank, g, n)
    A = np.zeros((g, rank))
    Bt = np.zeros((n, rank))
    P = np.zeros((rank, g))
    if not keep:
        return A, Bt, P
    w, u = top_eigh((mm + mm.T) / 2, keep)
    tol = max(float(w[0]), 0.0) * 1e-10
    r_eff = int(np.sum(w > tol))
    if not r_eff:
        return A, Bt, P
    s = np.sqrt(w[:r_eff])  # (r_eff,) = cb cf times M's singular values
    a = bb.astype(np.float64) @ (cf * f.T @ u[:, :r_eff]) / (s * cb)  # (Dg, r_eff) = beta V
    ag = a.T @ gram  # (r_eff, Dg)
    try:
        p = np.linalg.solve(ag @ a, ag)  # (r_eff, Dg)
    except np.linalg.LinAlgError:  # numerically singular: the least-norm solution
        p = np.linalg.lstsq(ag @ a, ag, rcond=None)[0]
    A[:, :r_eff] = a
    P[:r_eff] = p
    Bt[:, :r_eff] = (p.astype(beta.dtype) @ beta).T  # (N, r_eff)
    return A, Bt, P


def ols_beta(points_red: np.ndarray, points: np.ndarray, transform: np.ndarray | None,
             query_gram_full: np.ndarray | None, gram: np.ndarray, approximate: bool) -> np.ndarray:
    """OLS coefficients beta (Dg, N) of one cluster.

    points_red: (N, Dg) reduced points; points: (N, Dx); transform: (Dx, Dg) or None;
    query_gram_full: (Dx, Dx) Gram of the raw training queries (used when not
    approximate and the dimension is reduced); gram: (Dg, Dg) = T^T Q^T Q T.
    Approximate mode returns the reduced points' transpose in their own dtype (float32
    points keep the fit's O(N Dg^2) products in float32 BLAS).
    """
    if approximate or transform is None:
        return points_red.T
    rhs = transform.T.astype(np.float64) @ query_gram_full @ points.T.astype(np.float64)  # (Dg, N)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]
