"""Unconstrained space and z-scoring, both ways.

Training happens in z-space: each site is first mapped to unconstrained space with
NumPyro's ``biject_to(support)`` (so a Uniform(0, 1) site becomes a logit), then each token
is z-scored with the mean and standard deviation of the training simulations. Samples go
back through both maps, so every returned value lies in its site's support.

Discrete sites (Poisson counts, Bernoulli outcomes) are modelled as real numbers and are
rounded and clipped to their support on the way out (:class:`DiscreteRound`); training
blurs their latent integers with narrow Gaussian noise (``discrete_sites="dequantize"``,
:func:`dequantization_widths`).

A simplex site (``Dirichlet``) keeps one token per element through its centred log-ratio
(:class:`SimplexLogRatio`): ``K`` tokens that sum to zero, mapped back by a softmax, which
lands on the simplex wherever the network puts them.

With ``interval_sites="reflect"`` or ``"reject"``, a site on a bounded interval
(``Uniform(a, b)``, ``Beta``) is not mapped to a logit: it stays in its own coordinates,
and a draw the network puts outside the interval is mirrored back in
(:class:`IntervalReflect`) or redrawn by :meth:`Simformer.sample
<numpyro_simformer.Simformer.sample>` (:class:`IntervalClip`).
"""

from __future__ import annotations

import abc

import warnings
from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints, transforms as numpyro_transforms
from numpyro.distributions.transforms import biject_to

from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.model.sites import SiteInfo, discrete_support_bounds, support_bounds

__all__ = ["dequantization_widths", "integer_valued_sites", "site_bijection", "DiscreteRound",
           "outside_discrete_support", "warn_extrapolation", "SimplexLogRatio", "AbstractIntervalBijection",
           "IntervalClip", "IntervalReflect", "INTERVAL_SITES", "DISCRETE_SITES", "base_transform",
           "couples_elements", "TokenTransform", "fit_token_transform", "tokens_to_z"]


class SimplexLogRatio(numpyro_transforms.Transform):
    """R^K -> the K-simplex by a softmax; its inverse is the centred log-ratio.

    ``inv(p) = log p - mean(log p)`` keeps one coordinate per element (NumPyro's
    stick-breaking bijection keeps K - 1, which one token per element cannot hold). The
    map is not a bijection of R^K: shifting every coordinate by the same amount changes
    nothing, so the training data lie on the hyperplane of zero sum and whatever a sample
    puts off it is ignored. For the same reason there is no density on R^K to change
    variables with: :meth:`log_abs_det_jacobian` raises.
    """

    domain = constraints.real_vector
    codomain = constraints.simplex

    def __call__(self, x):
        return jax.nn.softmax(x, axis=-1)

    def _inverse(self, y):
        log_y = jnp.log(y)
        return log_y - jnp.mean(log_y, axis=-1, keepdims=True)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        raise NotImplementedError(
            "A simplex site is represented by its K centred log-ratios, which have no density on R^K: log "
            "densities with a simplex site latent are not available. Observe the simplex site, or sample."
        )

    def tree_flatten(self):
        return (), ((), {})

    def __eq__(self, other):
        return isinstance(other, SimplexLogRatio)


class DiscreteRound(numpyro_transforms.Transform):
    """R -> a discrete support: round to the nearest integer, clip to ``[lower, upper]``.

    The representation of a discrete site: the network treats it as real, and every value
    it produces is turned into a member of the support (``{0, 1}`` for a Bernoulli, ``0, 1,
    ...`` for a Poisson). Its inverse is the identity (integer values map to themselves);
    :func:`outside_discrete_support` says which values are not members. There is no
    Jacobian: a discrete site contributes nothing to a log density's change of variables.
    """

    domain = constraints.real
    codomain = constraints.real

    def __init__(self, lower, upper):
        self.lower = np.asarray(lower, dtype=np.float32)
        self.upper = np.asarray(upper, dtype=np.float32)

    def __call__(self, x):
        return jnp.clip(jnp.round(x), self.lower, self.upper)

    def _inverse(self, y):
        return y

    def outside(self, y: np.ndarray) -> np.ndarray:
        """bool, elementwise: ``y`` is not an integer within the bounds (NaN counts as inside)."""
        y = np.asarray(y, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return ~np.isnan(y) & ((y != np.round(y)) | (y < self.lower) | (y > self.upper))

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        return jnp.zeros(jnp.shape(x))

    def tree_flatten(self):
        return (), ((), {"lower": self.lower, "upper": self.upper})

    def __eq__(self, other):
        return (type(other) is type(self) and np.array_equal(self.lower, other.lower)
                and np.array_equal(self.upper, other.upper))


class AbstractIntervalBijection(numpyro_transforms.Transform):
    """R -> [lower, upper] for a site kept in its own coordinates; the identity inside.

    The two representations of ``interval_sites="reject"`` and ``"reflect"`` differ only in
    what they do with a value outside the interval (:meth:`__call__`) and in whether
    :meth:`~numpyro_simformer.Simformer.sample` redraws such values first
    (:attr:`rejects_outside`). The inverse is the identity inside and NaN outside (no
    density there, as a logit gives); the Jacobian is 1 inside. For an open interval the
    values stop one float32 step (or a relative float32 epsilon) inside each bound.
    """

    domain = constraints.real
    rejects_outside: bool  # each final subclass sets it

    def __init__(self, lower, upper, open_bounds: bool = False):
        self.lower = np.asarray(lower, dtype=np.float32)
        self.upper = np.asarray(upper, dtype=np.float32)
        self.open_bounds = bool(open_bounds)

    @property
    def codomain(self):
        return (constraints.open_interval if self.open_bounds else constraints.interval)(self.lower, self.upper)

    def clip_bounds(self):
        """The closed interval the values are clipped to (just inside an open one)."""
        if not self.open_bounds:
            return self.lower, self.upper
        # The next float32 inwards, or a relative step where that would be a denormal
        # (which XLA flushes to zero, back onto the bound).
        step = np.finfo(np.float32).eps * (self.upper - self.lower)
        lower = np.maximum(np.nextafter(self.lower, self.upper), self.lower + step)
        upper = np.minimum(np.nextafter(self.upper, self.lower), self.upper - step)
        return lower.astype(np.float32), upper.astype(np.float32)

    def _clip(self, x):
        lower, upper = self.clip_bounds()
        return jnp.clip(x, lower, upper)

    @abc.abstractmethod
    def __call__(self, x):
        """Unconstrained (own coordinates, any real) -> inside the interval."""

    def _inverse(self, y):
        # NaN outside the interval, as a logit gives: such points have no density (-inf).
        return jnp.where(self.codomain(y), y, jnp.nan)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        return jnp.zeros(jnp.shape(x))

    def tree_flatten(self):
        return (), ((), {"lower": self.lower, "upper": self.upper, "open_bounds": self.open_bounds})

    def __eq__(self, other):
        return (type(other) is type(self) and self.open_bounds == other.open_bounds
                and np.array_equal(self.lower, other.lower) and np.array_equal(self.upper, other.upper))


class IntervalClip(AbstractIntervalBijection):
    """The identity, clipped to the interval: ``interval_sites="reject"``.

    The network sees the site in its own coordinates, so a posterior cut off by a bound
    keeps a step at a finite place instead of a tail running off to infinity in logit
    space. Draws outside the interval are rejected before they get here, so the clip only
    removes rounding.
    """

    rejects_outside = True

    def __call__(self, x):
        return self._clip(x)


class IntervalReflect(AbstractIntervalBijection):
    """The identity inside, mirrored at the bounds outside (a fold): ``interval_sites="reflect"``.

    Trained in its own coordinates like :class:`IntervalClip`, but a value the network puts
    beyond a bound is mirrored back inside (``upper + d`` becomes ``upper - d``; repeated
    for values more than a width away). Where the network blurs a density that is high at
    the bound, the mass it spills over is the mass it misses just inside, and the mirror
    puts it back. The map is not one-to-one, so there is no density to change variables
    with: log densities with such a site latent raise.
    """

    rejects_outside = False

    def __call__(self, x):
        width = self.upper - self.lower
        offset = jnp.mod(x - self.lower, 2.0 * width)
        folded = self.lower + jnp.where(offset > width, 2.0 * width - offset, offset)
        folded = jnp.where((x >= self.lower) & (x <= self.upper), x, folded)  # inside: exactly x
        return self._clip(folded)  # rounding, and an open interval's bounds


# How sites on a bounded interval are represented: "transform" (NumPyro's logit bijection),
# or in their own coordinates with draws outside the interval "reflect"ed back in or
# "reject"ed and redrawn.
INTERVAL_SITES = ("transform", "reflect", "reject")
DISCRETE_SITES = ("dequantize", "integers")


def base_transform(bijection):
    """The transform inside any ``IndependentTransform`` wrappers (which only sum over event dims)."""
    while isinstance(bijection, numpyro_transforms.IndependentTransform):
        bijection = bijection.base_transform
    return bijection


def couples_elements(bijection) -> bool:
    """Whether a site's bijection mixes its elements (a simplex, an ordered vector)."""
    return base_transform(bijection).domain.event_dim > 0


def _bounds_of(bounds, shape) -> np.ndarray:
    """A site's bounds: one value when all its elements share it (so the bijection applies at
    any size, a series queried at new coordinates), else one per element of ``shape``."""
    bounds = np.broadcast_to(np.asarray(bounds, np.float32), tuple(shape))
    if bounds.size and np.all(bounds == bounds.flat[0]):
        return np.asarray(bounds.flat[0])
    return bounds


def site_bijection(site: SiteInfo, support=None, interval_sites: str = "transform"):
    """The map from unconstrained space onto ``site``'s support, one coordinate per element.

    NumPyro's ``biject_to(support)``, except for a simplex (:class:`SimplexLogRatio`) and,
    with ``interval_sites="reflect"`` or ``"reject"``, for a support that is a bounded
    interval (:class:`IntervalReflect`, :class:`IntervalClip`).

    Raises:
        NotImplementedError: when the support's bijection changes the shape (correlation
            matrices, ...): those sites cannot be tokens element by element yet.
    """
    support = site.support if support is None else support
    if interval_sites not in INTERVAL_SITES:
        raise ValueError(f"`interval_sites` must be one of {INTERVAL_SITES}, got {interval_sites!r}.")
    if site.is_discrete:
        lower, upper = discrete_support_bounds(support)
        return DiscreteRound(_bounds_of(lower, site.shape), _bounds_of(upper, site.shape))
    base_support = getattr(support, "base_constraint", support)
    if interval_sites != "transform" and isinstance(base_support, constraints._Interval):
        lower, upper = support_bounds(support)
        kind = IntervalReflect if interval_sites == "reflect" else IntervalClip
        return kind(_bounds_of(lower, site.shape), _bounds_of(upper, site.shape),
                    open_bounds=isinstance(base_support, constraints._OpenInterval))
    if isinstance(base_support, type(constraints.simplex)):
        base = SimplexLogRatio()
        batch_ndim = getattr(support, "reinterpreted_batch_ndims", 0)
        return numpyro_transforms.IndependentTransform(base, batch_ndim) if batch_ndim else base
    try:
        transform = biject_to(support)
    except NotImplementedError as error:
        raise NotImplementedError(
            f"Site {site.name!r} has support {support}, for which NumPyro has no bijection "
            "to unconstrained space. Exclude it (`exclude_sites=`) or reparametrise it."
        ) from error
    if tuple(transform.inverse_shape(site.shape)) != tuple(site.shape):
        raise NotImplementedError(
            f"Site {site.name!r} has support {support}, whose unconstrained form has a "
            f"different shape ({tuple(transform.inverse_shape(site.shape))} instead of "
            f"{site.shape}); one token per element is not possible. Reparametrise the site "
            "with elementwise-supported draws and build the value in a `numpyro.deterministic` "
            "(returned with every answer; e.g. a correlation matrix from Uniform(-1, 1) partial "
            "correlations), or exclude it."
        )
    return transform


@dataclass(frozen=True, eq=False)
class TokenTransform:
    """Flat constrained tokens <-> z-scored unconstrained tokens.

    Attributes:
        layout: the token layout.
        bijections: one NumPyro transform per site (unconstrained -> support).
        mean, std: float arrays (num_tokens,), z-scoring statistics in unconstrained space.
    """

    layout: TokenLayout
    bijections: tuple
    mean: np.ndarray
    std: np.ndarray

    def _per_site(self, tokens, apply):
        slices = self.layout.slices()
        batch_shape = tokens.shape[:-1]
        parts = []
        for site, bijection in zip(self.layout.sites, self.bijections):
            value = tokens[..., slices[site.name]].reshape(batch_shape + site.shape)
            parts.append(apply(bijection, value, site).reshape(batch_shape + (site.size,)))
        return jnp.concatenate(parts, axis=-1)

    def unconstrain(self, tokens):
        """Constrained (..., num_tokens) -> unconstrained (not yet z-scored)."""
        return self._per_site(tokens, lambda bijection, value, site: bijection.inv(value))

    def constrain(self, unconstrained):
        """Unconstrained (..., num_tokens) -> constrained; discrete sites rounded and clipped."""
        return self._per_site(unconstrained, lambda bijection, value, site: bijection(value))

    def on_layout(self, layout: TokenLayout) -> "TokenTransform":
        """This transform over another layout of the same sites (a query at new coordinates or
        plate sizes): each token takes the z-scoring statistics of its node."""
        node_mean = np.zeros(self.layout.num_nodes, np.float32)
        node_std = np.ones(self.layout.num_nodes, np.float32)
        node_mean[self.layout.node_ids], node_std[self.layout.node_ids] = self.mean, self.std
        return TokenTransform(layout, self.bijections, node_mean[layout.node_ids], node_std[layout.node_ids])

    @cached_property
    def to_z_fn(self):
        """:meth:`to_z`, jitted once per transform: repeated queries compile nothing."""
        return jax.jit(self.to_z)

    @cached_property
    def from_z_fn(self):
        """:meth:`from_z`, jitted once per transform."""
        return jax.jit(self.from_z)

    def to_z(self, tokens):
        """Constrained tokens -> z-space."""
        return (self.unconstrain(tokens) - self.mean) / self.std

    def from_z(self, z):
        """z-space -> constrained tokens."""
        return self.constrain(z * self.std + self.mean)

    def z_bounds(self):
        """Per-token ``(lower, upper)`` in z-space of the sites whose draws outside are
        rejected (:class:`IntervalClip`), or ``None``.

        float32 arrays (num_tokens,); ``-inf``/``inf`` for every other token. ``None`` when
        no site has one: there is nothing to reject.
        """
        rejecting = [isinstance(bijection, AbstractIntervalBijection) and bijection.rejects_outside
                     for bijection in self.bijections]
        if not any(rejecting):
            return None
        lower = np.full(self.layout.num_tokens, -np.inf, np.float32)
        upper = np.full(self.layout.num_tokens, np.inf, np.float32)
        slices = self.layout.slices()
        for site, bijection, rejects in zip(self.layout.sites, self.bijections, rejecting):
            if rejects:
                low, high = bijection.clip_bounds()
                lower[slices[site.name]] = np.ravel(np.broadcast_to(low, site.shape))
                upper[slices[site.name]] = np.ravel(np.broadcast_to(high, site.shape))
        lower = np.where(np.isfinite(lower), (lower - self.mean) / self.std, -np.inf)
        upper = np.where(np.isfinite(upper), (upper - self.mean) / self.std, np.inf)
        return lower.astype(np.float32), upper.astype(np.float32)

    def log_abs_det_jacobian_from_z(self, z):
        """log |d constrained / d z| summed over tokens, for each leading index of ``z``.

        Discrete sites contribute nothing (their density is not a density in z).
        """
        unconstrained = z * self.std + self.mean
        slices = self.layout.slices()
        total = jnp.sum(jnp.log(self.std)) * jnp.ones(z.shape[:-1])
        batch_shape = z.shape[:-1]
        for site, bijection in zip(self.layout.sites, self.bijections):
            if site.is_discrete:
                continue
            value = unconstrained[..., slices[site.name]].reshape(batch_shape + site.shape)
            log_det = bijection.log_abs_det_jacobian(value, bijection(value))
            total = total + jnp.sum(log_det.reshape(batch_shape + (-1,)), axis=-1)
        return total


def outside_discrete_support(transform: TokenTransform, tokens) -> np.ndarray:
    """bool (..., num_tokens): True where a discrete site's token is no member of its support.

    ``tokens`` are constrained (..., num_tokens); NaN (latent) tokens and continuous sites
    count as inside (a continuous site's support is checked through its bijection, whose
    inverse gives NaN outside).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    outside = np.zeros(tokens.shape, dtype=bool)
    slices = transform.layout.slices()
    for site, bijection in zip(transform.layout.sites, transform.bijections):
        if isinstance(bijection, DiscreteRound):
            values = tokens[..., slices[site.name]]
            outside[..., slices[site.name]] = bijection.outside(
                values.reshape(values.shape[:-1] + site.shape)).reshape(values.shape)
    return outside


# z-values beyond this many training standard deviations count as extrapolation: the
# training simulations of a Gaussian-like token reach it with probability 2e-9 each, so
# the network has seen essentially none there.
EXTRAPOLATION_Z = 6.0
# ... and a site is warned about when more than this share of its draws go there.
EXTRAPOLATION_SHARE = 0.01


def warn_extrapolation(layout: TokenLayout, z, condition_mask, *, threshold: float = EXTRAPOLATION_Z,
                       min_share: float = EXTRAPOLATION_SHARE, stacklevel: int = 3) -> None:
    """Warn, naming the sites, when latent draws lie far outside the training simulations.

    ``z`` (..., num_tokens) is in z-space, where the training simulations have mean 0 and
    standard deviation 1 per token; ``condition_mask`` broadcasts to it. A draw with a
    latent token beyond ``threshold`` is an extrapolation of the network, not an answer it
    learned (a short fit can put a HalfNormal posterior in the thousands). A site is named
    when more than ``min_share`` of its draws are such: a well-trained network's reverse
    SDE leaves a stray draw out there now and then (0.1 % of 10,000 in the test suite's
    linear-Gaussian posterior), which says nothing about the answer.
    """
    z = np.asarray(z)
    far = (np.abs(z) > threshold) & ~np.broadcast_to(np.asarray(condition_mask, dtype=bool), z.shape)
    if not far.any():
        return
    draws = far.reshape(-1, layout.num_tokens)
    slices = layout.slices()
    parts = []
    for site in layout.sites:
        share = float(np.mean(draws[:, slices[site.name]].any(axis=-1)))
        if share > min_share:
            parts.append(f"{site.name!r} ({share:.1%} of draws)")
    if not parts:
        return
    warnings.warn(
        f"Draws of {', '.join(parts)} lie more than {threshold:g} standard deviations of the training "
        f"simulations away from their mean (up to {float(np.max(np.abs(z[far]))):.3g}): the network is "
        "extrapolating there, and those values are not to be trusted. Check that the observation is one the "
        "model can produce, or train longer / on more simulations.",
        stacklevel=stacklevel,
    )


def tokens_to_z(layout: TokenLayout, tokens: np.ndarray, supports=None, pool_nodes: bool = False,
                interval_sites: str = "transform", *, chunk_size: int = 65_536) -> tuple[TokenTransform, np.ndarray]:
    """Fit the token transform to simulated tokens and turn them into z-space, in place.

    The simulation table is never copied whole: the bijections run over chunks of
    ``chunk_size`` rows and write back into ``tokens``, and the z-scoring follows in place,
    so the host holds the table once and the device one chunk at a time.

    Args:
        layout: the token layout.
        tokens: float32 (num_simulations, num_tokens), C-contiguous, constrained, all
            finite; overwritten with the z-scored unconstrained values.
        supports: optional per-site supports overriding those in the layout (used when a
            site's support depends on its parents and a constant fallback was chosen).
        pool_nodes: share one mean and std among the tokens of a node id (the elements of
            a variable-size dim, whose positions change between training and queries).
        interval_sites: ``"transform"``, ``"reflect"`` or ``"reject"``, see :func:`site_bijection`.
        chunk_size: rows per jitted call.

    Returns:
        ``(transform, finite)``: the fitted :class:`TokenTransform`, and bool
        (num_simulations,), False for rows on a support's boundary (infinite in
        unconstrained space; left out of the statistics, and of training by the caller).
    """
    if tokens.dtype != np.float32 or not tokens.flags.c_contiguous:
        raise TypeError("`tokens` must be a C-contiguous float32 array: it is converted in place.")
    bijections = tuple(
        site_bijection(site, None if supports is None else supports[site.name], interval_sites)
        for site in layout.sites
    )
    transform = TokenTransform(layout, bijections, np.zeros(layout.num_tokens, np.float32),
                               np.ones(layout.num_tokens, np.float32))
    unconstrain = jax.jit(transform.unconstrain)
    for start in range(0, tokens.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        tokens[rows] = np.asarray(unconstrain(tokens[rows]))
    finite = np.all(np.isfinite(tokens), axis=-1)
    unconstrained = tokens
    if not finite.all():
        bad = np.where(~np.all(np.isfinite(tokens), axis=0))[0]
        labels = [layout.labels[i] for i in bad[:5]]
        warnings.warn(
            f"{int((~finite).sum())} simulations lie on the boundary of their support in "
            f"unconstrained space (tokens {labels}); they are dropped from training and "
            "counted as invalid in `simulation_info`.",
            stacklevel=3,
        )
        unconstrained = tokens[finite]
    if pool_nodes:
        from numpyro_simformer.model.variable import pooled_statistics

        node_mean, node_std = pooled_statistics(unconstrained, layout.node_ids)
        mean, std = node_mean[layout.node_ids], node_std[layout.node_ids]
    else:
        mean = unconstrained.mean(axis=0).astype(np.float32)
        std = unconstrained.std(axis=0).astype(np.float32)
        std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    del unconstrained
    fitted = TokenTransform(layout, bijections, mean, std)
    # z-scored by XLA as `to_z` does it (the statistics are constants of the program), so
    # the training data are the same floats as `to_z` gives for the constrained tokens
    z_score = jax.jit(lambda value: (value - fitted.mean) / fitted.std)
    for start in range(0, tokens.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        tokens[rows] = np.asarray(z_score(tokens[rows]))
    return fitted, finite


def dequantization_widths(transform: TokenTransform) -> np.ndarray | None:
    """float32 (num_tokens,): the integers' unit spacing in z-space (``1 / std``) for the
    elements of discrete sites, 0 elsewhere; ``None`` when the layout has no discrete site."""
    widths = np.zeros(transform.layout.num_tokens, np.float32)
    slices = transform.layout.slices()
    for site in transform.layout.sites:
        if site.is_discrete:
            widths[slices[site.name]] = 1.0 / transform.std[slices[site.name]]
    return widths if widths.any() else None


def integer_valued_sites(layout: TokenLayout, tokens: np.ndarray, *, min_rows: int = 20,
                         chunk_rows: int = 4_096) -> list[str]:
    """Continuous sites whose every simulated value is an integer (in at least ``min_rows``
    rows of constrained ``tokens``, (num_simulations, num_tokens)), and not all the same
    one: discrete outputs whose support was not declared.

    Read ``chunk_rows`` rows at a time, stopping at a site's first non-integer chunk, so the
    check costs a chunk's memory, and for a real-valued site about one chunk's time.
    """
    if tokens.shape[0] < min_rows:
        return []
    slices = layout.slices()
    found = []
    for site in layout.sites:
        if site.is_discrete or site.size == 0:
            continue
        values = tokens[:, slices[site.name]]
        chunks = (values[start:start + chunk_rows] for start in range(0, values.shape[0], chunk_rows))
        if all(np.array_equal(chunk, np.round(chunk)) for chunk in chunks) and values.min() != values.max():
            found.append(site.name)
    return found


def fit_token_transform(layout: TokenLayout, tokens: np.ndarray, supports=None, pool_nodes: bool = False,
                        interval_sites: str = "transform") -> TokenTransform:
    """Bijections for each site and z-scoring statistics from simulated constrained tokens.

    As :func:`tokens_to_z`, on a copy of ``tokens`` (num_simulations, num_tokens).
    """
    transform, _ = tokens_to_z(layout, np.array(tokens, dtype=np.float32, order="C"), supports, pool_nodes,
                               interval_sites)
    return transform


def constant_support(site: SiteInfo, supports_seen: list) -> object:
    """The site's support if it is the same in every trace, else ``constraints.real``.

    A support that depends on the parents (``Uniform(0, theta)``) cannot be mapped with one
    bijection; such a site is modelled in its raw space and a warning says so.
    """
    bounds = [support_bounds(support) for support in supports_seen]
    first_lower, first_upper = bounds[0]
    for lower, upper in bounds[1:]:
        for a, b in ((first_lower, lower), (first_upper, upper)):
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                warnings.warn(
                    f"The support of site {site.name!r} changes between simulations (its "
                    "bounds depend on other sites); it is modelled without a support "
                    "transform, so its samples may leave the support slightly.",
                    stacklevel=2,
                )
                return constraints.real
    return site.support
