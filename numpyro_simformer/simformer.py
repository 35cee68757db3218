"""The front object: a NumPyro model in, a trained Simformer out, any conditional back.

Example:
    >>> import jax, numpyro, numpyro.distributions as dist
    >>> from numpyro_simformer import Simformer
    >>> def model():
    ...     theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    ...     numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))
    >>> sf = Simformer(model, num_simulations=5_000)
    >>> sf.fit(jax.random.key(0))                                        # doctest: +SKIP
    >>> post = sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=2_000)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import time as _time
import warnings
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from flax import nnx

from numpyro_simformer import __version__
from numpyro_simformer._checks import check_rng_key
from numpyro_simformer.convert import to_datatree
from numpyro_simformer.layout import TokenLayout
from numpyro_simformer.loss import build_example_losses_fn
from numpyro_simformer.masks import ConditionMaskDistribution
from numpyro_simformer.parallel import resolve_devices
from numpyro_simformer.nn import NetworkConfig, SimformerNetwork, build_denoiser_fn
from numpyro_simformer.query import batched_observed_tokens, interval_bounds, observed_tokens, to_z_checked
from numpyro_simformer.samplers import EulerMaruyama, GuidedEulerMaruyama, build_score_fn
from numpyro_simformer.samplers.guidance import GaussianIntervalGuidance, IntervalBounds, build_interval_score_fn
from numpyro_simformer.sde import VESDE
from numpyro_simformer.serialization import ensure_writable_directory
from numpyro_simformer.simulate import SimulationInfo, filter_finite, simulate
from numpyro_simformer.sites import is_factor, read_sites, trace_model
from numpyro_simformer.train import TrainingConfig, train
from numpyro_simformer.rejection import SUPPORT_STREAM, draws_in_support, inside_support
from numpyro_simformer.transforms import (INTERVAL_SITES, IntervalReflect, constant_support, fit_token_transform,
                                          warn_extrapolation)

__all__ = ["Simformer"]

# Below this many valid simulations fit warns: statistics and validation from a handful of rows.
_FEW_SIMULATIONS = 100

_ATTENTION_KINDS = ("undirected", "dense", "directed")


def _check_names_fit_datatree(sites) -> None:
    """Answers are DataTrees, whose variable and dimension names cannot hold '/': say so before training."""
    for site in sites:
        bad = [name for name in (site.name, *site.dims) if "/" in name]
        if bad:
            kind = "site" if bad[0] == site.name else "plate"
            raise ValueError(
                f"The {kind} name {bad[0]!r} (site {site.name!r}) contains '/', which an xarray DataTree "
                "cannot hold in a variable or dimension name (it separates groups). Rename it in the model, "
                "e.g. with '_' instead of '/'."
            )


def _warn_sites_simulation_ignores(trace) -> None:
    """Warn about ``obs=`` and ``numpyro.factor`` sites: forward simulation cannot honour them.

    Simulation draws every site from its distribution in turn, so a site given with ``obs=``
    (or by ``handlers.condition``) and a factor's log-weight change nothing in the draws: the
    Simformer learns the joint of the other sites as if those terms were absent.
    """
    ignored = [name for name, site in trace.items() if site["type"] == "sample" and site["is_observed"]]
    if not ignored:
        return
    factors = [name for name in ignored if is_factor(trace[name])]
    observed = [name for name in ignored if name not in factors]
    found = " and ".join(part for part in (
        f"observes site(s) {observed} (`obs=`)" if observed else "",
        f"has factor site(s) {factors} (`numpyro.factor`)" if factors else "",
    ) if part)
    warnings.warn(
        f"The model {found}. Simulation runs the model forward, drawing each site from its "
        "distribution, so these terms do not shape the simulated joint: the Simformer learns the "
        "model as if they were absent. To condition on such data, remove `obs=` from the model and "
        "pass the values as `observed=` when sampling; a factor cannot be simulated forward, so "
        "write what it encodes as a sample site or drop it.",
        stacklevel=4,  # the user's call of `fit`
    )


class Simformer:
    """Simulation-based inference for a NumPyro model with one transformer for every conditional.

    Args:
        model: a NumPyro model. Its unobserved sample sites are the tokens: one token per
            scalar element. Parameters are sites with children in the model graph, data
            are sites without children.
        num_simulations: joint draws used for training by :meth:`fit`.
        network: a :class:`~numpyro_simformer.nn.NetworkConfig`.
        sde: the diffusion, :class:`~numpyro_simformer.sde.VESDE` (default) or ``VPSDE``.
        training: a :class:`~numpyro_simformer.train.TrainingConfig`.
        sampler: the default sampler of :meth:`sample`.
        condition_masks: the training mixture over condition masks.
        attention: ``"undirected"`` (default: the moral graph of the model's element-level
            dependency graph, valid for every query), ``"dense"``, or a bool array
            (num_tokens, num_tokens) with ``[i, j]`` True when token i may attend to j.
        parents: optional bool array (num_tokens, num_tokens), ``[i, j]`` True when token
            j is a direct parent of token i; overrides the extracted graph (for a simulator
            JAX cannot trace).
        token_sites: the sites to make tokens (default: all unobserved sample sites).
        exclude_sites: sites to leave out (simulator-internal noise); they are
            marginalised out of the graph.
        data_sites: the sites treated as data by the posterior/likelihood training masks
            (default: sites without children in the graph).
        simulation_chunk_size: draws per jitted simulation call.
        coordinates: ``{dim: argument}`` for time series and function-valued sites: ``dim``
            is a plate name (or a dim name such as ``"beta_dim_0"``, or a site name for its
            first axis) and ``argument`` the model keyword argument holding the coordinate
            of each element along it (``{"time": "t"}`` for ``def model(t): ...  with
            numpyro.plate("time", len(t))``). Training uses random subsets of the
            simulated grid; queries pass new coordinates with ``model_kwargs``. See
            ``docs/time-series.md``.
        exchangeable: plate names whose size may differ between training and queries (iid
            trials): the elements along them share one embedding.
        points_per_dim: the most positions along each coordinate or exchangeable dim in one
            training example (each example draws between 1 and this many at random).
        interval_sites: how sites whose support is a bounded interval (``Uniform(a, b)``,
            ``Beta``) are represented. ``"transform"`` (default): on NumPyro's logit scale,
            where every value the network produces maps inside the interval. ``"reflect"``:
            in their own coordinates, a draw beyond a bound mirrored back inside (no
            :meth:`log_prob` for such sites). ``"reject"``: in their own coordinates,
            draws outside the interval redrawn by :meth:`sample` (the network's answer
            restricted to the support) and :meth:`log_prob` renormalised. For posteriors
            cut off by a bound; which is better depends on the model, measured in
            ``docs/bounded-sites.md``. Every returned value lies in the support.
        progress_bar: show progress bars for simulation, training (loss, steps/s, time
            left) and sampling (when a query takes several jitted calls).
    """

    def __init__(
        self,
        model: Callable,
        *,
        num_simulations: int = 10_000,
        network: NetworkConfig = NetworkConfig(),
        sde=VESDE(),
        training: TrainingConfig = TrainingConfig(),
        sampler=EulerMaruyama(),
        condition_masks: ConditionMaskDistribution = ConditionMaskDistribution(),
        attention: str | np.ndarray = "undirected",
        parents: np.ndarray | None = None,
        token_sites: Sequence[str] | None = None,
        exclude_sites: Sequence[str] = (),
        data_sites: Sequence[str] | None = None,
        simulation_chunk_size: int = 10_000,
        coordinates: Mapping[str, str] | None = None,
        exchangeable: Sequence[str] = (),
        points_per_dim: int = 20,
        interval_sites: str = "transform",
        progress_bar: bool = True,
    ):
        if not callable(model):
            raise TypeError(f"`model` must be a NumPyro model (a callable), got {type(model).__name__}.")
        if not isinstance(num_simulations, (int, np.integer)) or num_simulations <= 0:
            raise ValueError(
                f"`num_simulations` must be a positive integer, got {num_simulations!r}."
            )
        if isinstance(attention, str) and attention not in _ATTENTION_KINDS:
            raise ValueError(f"`attention` must be one of {_ATTENTION_KINDS} or a bool array, got {attention!r}.")
        if isinstance(exclude_sites, str) or isinstance(token_sites, str) or isinstance(data_sites, str):
            raise TypeError("`token_sites`, `exclude_sites` and `data_sites` take a list of site names, not a string.")
        self.model = model
        self.num_simulations = int(num_simulations)
        self.network_config = network
        self.sde = sde
        self.training_config = training
        self.sampler = sampler
        self.condition_masks = condition_masks
        self.attention = attention
        self.token_sites = None if token_sites is None else list(token_sites)
        self.exclude_sites = list(exclude_sites)
        self.data_sites = None if data_sites is None else list(data_sites)
        self.simulation_chunk_size = int(simulation_chunk_size)
        if coordinates is not None and not isinstance(coordinates, Mapping):
            raise TypeError(f"`coordinates` must be a dict {{dim: model argument name}}, got {type(coordinates).__name__}.")
        if isinstance(exchangeable, str):
            raise TypeError("`exchangeable` takes a list of plate names, not a string.")
        if not isinstance(points_per_dim, (int, np.integer)) or points_per_dim < 1:
            raise ValueError(f"`points_per_dim` must be a positive integer, got {points_per_dim!r}.")
        if interval_sites not in INTERVAL_SITES:
            raise ValueError(f"`interval_sites` must be one of {INTERVAL_SITES}, got {interval_sites!r}.")
        self.interval_sites = interval_sites
        self.coordinates = dict(coordinates or {})
        self.exchangeable = tuple(exchangeable)
        self.points_per_dim = int(points_per_dim)
        self.progress_bar = progress_bar
        self._user_parents = None if parents is None else np.asarray(parents, dtype=bool)
        self._fitted = False
        self._sample_fns = {}

    # ------------------------------------------------------------------ model reading
    def _read_model(self, rng_key, model_args, model_kwargs, simulating=False):
        key_first, key_second, key_graph = jax.random.split(rng_key, 3)
        first = trace_model(key_first, self.model, model_args, model_kwargs)
        sites = read_sites(first, self.token_sites, self.exclude_sites)
        _check_names_fit_datatree(sites)
        if simulating:
            _warn_sites_simulation_ignores(first)
        second = trace_model(key_second, self.model, model_args, model_kwargs)
        self._supports = {
            site.name: constant_support(site, [site.support, second[site.name]["fn"].support]) for site in sites
        }
        self._model_args, self._model_kwargs = tuple(model_args), dict(model_kwargs)
        self.variable_dims = None
        if self.coordinates or self.exchangeable:
            from numpyro_simformer.variable import coordinate_scales, resolve_variable_dims, variable_layout

            self.variable_dims = resolve_variable_dims(sites, self.coordinates, self.exchangeable, model_kwargs)
            self._coordinate_scales = coordinate_scales(self.variable_dims)
            self.layout = variable_layout(sites, self.variable_dims, self._coordinate_scales)
        else:
            self.layout = TokenLayout.from_sites(sites)
        self.parents = self._graph(key_graph, model_args, model_kwargs)
        self.attention_mask = self._attention_mask()
        if self.variable_dims is not None:
            from numpyro_simformer.variable import close_over_variable, variable_token_mask

            self.attention_mask = close_over_variable(self.attention_mask,
                                                      variable_token_mask(self.layout, self.variable_dims))
        has_children = self._sites_with_children()
        if self.data_sites is None:
            data_sites = [site.name for site in sites if not has_children[site.name]]
        else:
            unknown = [name for name in self.data_sites if name not in self.layout.site_names]
            if unknown:
                raise ValueError(f"`data_sites` names {unknown}, which are not token sites {self.layout.site_names}.")
            data_sites = self.data_sites
        self._has_children = has_children
        self._data_site_names = list(data_sites)
        self._data_mask = self._token_data_mask(self.layout)

    def _token_data_mask(self, layout: TokenLayout) -> np.ndarray:
        """bool (num_tokens,) of ``layout``: True on the data sites' tokens."""
        slices = layout.slices()
        mask = np.zeros(layout.num_tokens, dtype=bool)
        for name in self._data_site_names:
            mask[slices[name]] = True
        return mask

    def _graph(self, rng_key, model_args, model_kwargs) -> np.ndarray:
        num_tokens = self.layout.num_tokens
        if self._user_parents is not None:
            if self._user_parents.shape != (num_tokens, num_tokens):
                raise ValueError(
                    f"`parents` has shape {self._user_parents.shape}, but the model has "
                    f"{num_tokens} tokens ({self.layout.labels[:6]}...): expected "
                    f"({num_tokens}, {num_tokens})."
                )
            return self._user_parents & ~np.eye(num_tokens, dtype=bool)
        from numpyro_simformer.graph import element_parents

        with numpyro.validation_enabled(False):  # as in simulation: bad draws are counted later
            labels, parents = element_parents(
                self.model, model_args, model_kwargs, token_sites=self.token_sites,
                exclude_sites=self.exclude_sites, rng_key=rng_key,
            )
        if list(labels) != self.layout.labels:
            raise AssertionError("The dependency graph's token order differs from the layout's.")
        return np.asarray(parents, dtype=bool)

    def _attention_mask(self) -> np.ndarray:
        num_tokens = self.layout.num_tokens
        if not isinstance(self.attention, str):
            mask = np.asarray(self.attention, dtype=bool)
            if mask.shape != (num_tokens, num_tokens):
                raise ValueError(
                    f"`attention` has shape {mask.shape}; the model has {num_tokens} tokens, "
                    f"so it must be ({num_tokens}, {num_tokens})."
                )
            return mask | np.eye(num_tokens, dtype=bool)
        if self.attention == "dense":
            return np.ones((num_tokens, num_tokens), dtype=bool)
        from numpyro_simformer.graph import attention_mask

        return np.asarray(attention_mask(self.parents, self.attention), dtype=bool)

    def _sites_with_children(self) -> dict[str, bool]:
        site_of_token = self.layout.site_of_token()
        result = {}
        for index, site in enumerate(self.layout.sites):
            own = site_of_token == index
            result[site.name] = bool(self.parents[np.ix_(~own, own)].any())
        return result

    # ------------------------------------------------------------------ fitting
    def fit(self, rng_key, *model_args, **model_kwargs) -> "Simformer":
        """Simulate ``num_simulations`` joint draws from the model and train on them.

        Args:
            rng_key: a JAX PRNG key; the whole fit is a function of it.
            *model_args, **model_kwargs: passed to the model, as in ``MCMC.run``.

        Returns:
            ``self``, fitted.
        """
        check_rng_key(rng_key, "Simformer.fit")
        ensure_writable_directory(self.training_config.checkpoint_dir, "TrainingConfig.checkpoint_dir")
        key_read, key_simulate, key_train = jax.random.split(rng_key, 3)
        self._read_model(key_read, model_args, model_kwargs, simulating=True)
        self._fit_draws(key_train, *self._simulate(key_simulate, model_args, model_kwargs))
        return self

    def _simulate(self, rng_key, model_args, model_kwargs):
        """``(draws, info)``: ``num_simulations`` joint draws of the token sites (model read
        first), timed in ``simulation_time``."""
        start = _time.perf_counter()
        simulations = simulate(
            rng_key, self.model, self.num_simulations, self.layout.site_names, model_args, model_kwargs,
            chunk_size=self.simulation_chunk_size, progress_bar=self.progress_bar,
            data_parallel=resolve_devices(self.training_config.data_parallel),
        )
        self.simulation_time = _time.perf_counter() - start
        return simulations

    def fit_simulations(self, rng_key, simulations: Mapping[str, np.ndarray], *model_args, **model_kwargs) -> "Simformer":
        """Train on simulations the user already has.

        Args:
            rng_key: a JAX PRNG key.
            simulations: ``{site: array (num_simulations, *site.shape)}`` for every token
                site. Rows with a NaN or inf are dropped and counted.
            *model_args, **model_kwargs: passed to the model (read for its sites and graph).
        """
        check_rng_key(rng_key, "Simformer.fit_simulations")
        ensure_writable_directory(self.training_config.checkpoint_dir, "TrainingConfig.checkpoint_dir")
        key_read, key_train = jax.random.split(rng_key)
        self._read_model(key_read, model_args, model_kwargs)
        if not isinstance(simulations, Mapping):
            raise TypeError(f"`simulations` must be a dict of site arrays, got {type(simulations).__name__}.")
        missing = [name for name in self.layout.site_names if name not in simulations]
        if missing:
            raise ValueError(f"`simulations` lacks the token sites {missing}; it must hold every one of {self.layout.site_names}.")
        lengths = set()
        for site in self.layout.sites:
            value = np.asarray(simulations[site.name])
            if value.shape[1:] != site.shape:
                raise ValueError(
                    f"simulations[{site.name!r}] has shape {value.shape}; expected "
                    f"(num_simulations, *{site.shape})."
                )
            lengths.add(value.shape[0])
        if len(lengths) != 1:
            raise ValueError(f"The sites of `simulations` have different numbers of rows: {sorted(lengths)}.")
        draws, finite = filter_finite({name: simulations[name] for name in self.layout.site_names})
        info = SimulationInfo(len(finite), int(finite.sum()), int((~finite).sum()), vectorized=False)
        self.simulation_time = 0.0
        self._fit_draws(key_train, draws, info)
        return self

    def _fit_draws(self, rng_key, draws, info: SimulationInfo):
        self.simulation_info = info
        if info.num_valid == 0:
            raise RuntimeError(
                f"All {info.num_requested} simulations contained NaN or inf; there is nothing "
                "to train on. Check the simulator (and its priors) for values it cannot handle."
            )
        if info.num_invalid:
            warnings.warn(
                f"{info.num_invalid} of {info.num_requested} simulations contained NaN or inf "
                "and were dropped.",
                stacklevel=3,
            )
        tokens = np.asarray(self.layout.flatten(draws), dtype=np.float32)
        # Emptied (the callers' dicts too) so that the draws are freed once tokenised: each
        # copy of the simulations costs host memory in proportion to their number.
        draws.clear()
        self.transform = fit_token_transform(self.layout, tokens, self._supports,
                                             pool_nodes=self.variable_dims is not None,
                                             interval_sites=self.interval_sites)
        data = np.asarray(jax.jit(self.transform.to_z)(tokens))
        del tokens
        finite = np.all(np.isfinite(data), axis=1)
        if not finite.all():  # on a support's boundary: counted as invalid (transforms.py warns)
            data = data[finite]
            self.simulation_info = info._replace(num_valid=int(finite.sum()),
                                                 num_invalid=info.num_invalid + int((~finite).sum()))
        if data.shape[0] < _FEW_SIMULATIONS:
            held_out = self.training_config.num_validation(data.shape[0])
            warnings.warn(
                f"Training on only {data.shape[0]} valid simulations: the z-scoring statistics come "
                f"from them and {held_out} are held out for validation"
                f"{' (none: training never stops early)' if held_out == 0 else ''}. Answers from so few "
                f"are rough; raise `num_simulations` (a few hundred at least, thousands for most models).",
                stacklevel=3,
            )
        key_init, key_train = jax.random.split(rng_key)
        if self.variable_dims is not None:
            from dataclasses import replace as _replace

            self.network_config = _replace(self.network_config, variable_size=True)
        network = SimformerNetwork(self.layout.num_nodes, self.network_config,
                                   rngs=nnx.Rngs(params=key_init))
        graphdef, params, constants = nnx.split(network, nnx.Param, ...)
        self._graphdef, self._constants = graphdef, constants
        self._build_functions()
        denoiser_fn, subsample, data_mask = self._denoiser_fn, None, self._data_mask
        if self.variable_dims is not None:  # train on random subsets: the subset's node ids
            from numpyro_simformer.variable import Subsampler

            subsample = Subsampler.build(self.layout, self.variable_dims, self.attention_mask, self.points_per_dim)
            data_mask = self._token_data_mask(subsample.template)
            denoiser_fn = functools.partial(self._denoiser_fn, node_ids=jnp.asarray(subsample.template.node_ids))
        example_losses_fn = build_example_losses_fn(denoiser_fn, self.sde)
        start = _time.perf_counter()
        self.params, self.history = train(
            key_train, example_losses_fn, params, data, data_mask, self.training_config, self.condition_masks,
            progress_bar=self.progress_bar,
            checkpoint_tag=repr((self.layout.labels, self.network_config, self.sde,
                                 np.packbits(self.attention_mask).tobytes(), self.points_per_dim)),
            subsample=subsample,
        )
        self.training_time = _time.perf_counter() - start
        self._fitted = True

    def _build_functions(self):
        self._denoiser_fn = build_denoiser_fn(
            self._graphdef, self._constants, self.layout.node_ids, self.layout.coordinates, self.attention_mask
        )
        self._score_fn = build_score_fn(self._denoiser_fn, self.sde)
        self._sample_fns = {}
        self._log_prob_fns = {}
        self._default_query = _Query(self.layout, self.transform, self._score_fn, self._sample_fns,
                                     self._log_prob_fns,
                                     self._coordinate_values(self.layout, getattr(self, "variable_dims", None)),
                                     self.attention_mask, getattr(self, "variable_dims", None))
        self._queries = {}

    def _coordinate_values(self, layout, variable) -> dict:
        """``{dim: coordinates}`` of the coordinate dims, as DataTree coordinates."""
        if variable is None:
            return {}
        return {key: np.asarray(value) for key, value in variable.coordinates.items()
                if any(key in site.dims for site in layout.sites)}

    def _query(self, model_kwargs) -> "_Query":
        """The layout, transform and network functions of a query at ``model_kwargs``.

        ``None`` is the training layout. Otherwise the model is traced with its training
        keyword arguments updated by ``model_kwargs`` (new coordinates, a new plate size),
        and the token layout, graph and attention mask are rebuilt for it.
        """
        if model_kwargs is None:
            return self._default_query
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"`model_kwargs` must be a dict of the model's keyword arguments, got "
                            f"{type(model_kwargs).__name__}.")
        if self.variable_dims is None:
            raise ValueError(
                "`model_kwargs` changes the model's sizes or coordinates, but this Simformer has no variable-size "
                "dims: its layout is fixed by `fit`. Declare `coordinates=` or `exchangeable=` when creating it."
            )
        kwargs = {**self._model_kwargs, **dict(model_kwargs)}
        cache_key = tuple(sorted((name, np.asarray(value).tobytes() if hasattr(value, "shape") else repr(value))
                                 for name, value in kwargs.items()))
        if cache_key in self._queries:
            return self._queries[cache_key]
        from numpyro_simformer.graph import attention_mask as graph_attention_mask, element_parents
        from numpyro_simformer.transforms import TokenTransform
        from numpyro_simformer.variable import (close_over_variable, node_level_mask, node_shapes,
                                                resolve_variable_dims, variable_layout, variable_token_mask)

        key = jax.random.key(0)  # the query's structure does not depend on a key; reading it is deterministic
        sites = read_sites(trace_model(key, self.model, self._model_args, kwargs), self.layout.site_names,
                           self.exclude_sites)
        variable = resolve_variable_dims(sites, self.coordinates, self.exchangeable, kwargs)
        trained_shapes, shapes = node_shapes(self.layout.sites, self.variable_dims), node_shapes(sites, variable)
        for site in sites:
            if shapes[site.name] != trained_shapes[site.name]:
                raise ValueError(
                    f"Site {site.name!r} has shape {site.shape} at these model arguments; only its variable-size "
                    f"dims may change, so its other axes must keep the trained shape {trained_shapes[site.name]}."
                )
        layout = variable_layout(sites, variable, self._coordinate_scales)
        if self._user_parents is not None or not isinstance(self.attention, str):
            raise ValueError("A query at new model arguments needs the model's graph at them; a user-given "
                             "`parents` or `attention` array fits the training layout only.")
        node_mask = None if self.attention == "dense" else node_level_mask(self.attention_mask, self.layout.node_ids)
        if self.attention == "dense":
            mask = np.ones((layout.num_tokens, layout.num_tokens), dtype=bool)
        elif node_mask is not None:  # attention depends on the nodes only: the same rule at any size
            mask = node_mask[np.ix_(layout.node_ids, layout.node_ids)] | np.eye(layout.num_tokens, dtype=bool)
        else:
            with numpyro.validation_enabled(False):
                _, parents = element_parents(self.model, self._model_args, kwargs, token_sites=self.layout.site_names,
                                             exclude_sites=self.exclude_sites, rng_key=key)
            mask = np.asarray(graph_attention_mask(np.asarray(parents, bool), self.attention), dtype=bool)
        mask = close_over_variable(mask, variable_token_mask(layout, variable))
        node_mean = np.zeros(self.layout.num_nodes, np.float32)
        node_std = np.ones(self.layout.num_nodes, np.float32)
        node_mean[self.layout.node_ids], node_std[self.layout.node_ids] = self.transform.mean, self.transform.std
        transform = TokenTransform(layout, self.transform.bijections, node_mean[layout.node_ids],
                                   node_std[layout.node_ids])
        denoiser_fn = build_denoiser_fn(self._graphdef, self._constants, layout.node_ids, layout.coordinates, mask)
        query = _Query(layout, transform, build_score_fn(denoiser_fn, self.sde), {}, {},
                       self._coordinate_values(layout, variable), mask, variable, kwargs)
        self._queries[cache_key] = query
        return query

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, *, overwrite: bool = False):
        """Write the fitted Simformer to the directory ``path``: Orbax weights and a JSON record.

        See :mod:`numpyro_simformer.checkpoint` for what is stored; no pickle is used.

        Args:
            path: the directory to create.
            overwrite: replace an existing checkpoint at ``path``.

        Returns:
            The checkpoint's path.
        """
        from numpyro_simformer.checkpoint import save_simformer

        self._check_fitted("save")
        if getattr(self, "variable_dims", None) is not None:
            raise NotImplementedError(
                "Saving a Simformer with `coordinates` or `exchangeable` dims is not supported yet: the "
                "checkpoint format stores a fixed token layout. Refit it, or train without variable-size dims."
            )
        return save_simformer(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, model: Callable, *model_args, **model_kwargs) -> "Simformer":
        """Rebuild a fitted Simformer from a checkpoint written by :meth:`save` and its model.

        The model is traced once with ``model_args``/``model_kwargs``; its sites must match
        the checkpoint's. The loaded object gives the same samples for the same key.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            numpyro_simformer.checkpoint.CheckpointError: when the checkpoint is
                unreadable, truncated or altered.
            numpyro_simformer.checkpoint.ModelMismatchError: when a site of the model
                differs from the checkpoint's (the message names it).
        """
        from numpyro_simformer.checkpoint import load_simformer

        return load_simformer(path, model, model_args, model_kwargs, cls=cls)

    # ------------------------------------------------------------------ querying
    def _check_fitted(self, method: str):
        if not self._fitted:
            raise RuntimeError(f"`{method}` needs a fitted Simformer: call `fit(rng_key, ...)` first.")

    def _sample_fn(self, sampler, chunk: int, guidance=None, batched: bool = False, query=None):
        """Jitted ``fn(rng_key, params, values, mask)``; ``batched``: vmapped over observations
        (keys, values, mask); with ``guidance``, ``params`` is ``(params, IntervalBounds)``."""
        query = self._default_query if query is None else query
        key = (sampler, chunk, guidance, batched)
        if key not in query.sample_fns:
            score_fn = query.score_fn
            if guidance is not None:
                score_fn = build_interval_score_fn(score_fn, self.sde, guidance)
            sample_fn = sampler.build(score_fn, self.sde)

            def one(rng_key, params, values, mask):
                return sample_fn(rng_key, params, values, mask, chunk)

            query.sample_fns[key] = jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)) if batched else one)
        return query.sample_fns[key]

    def sample(self, rng_key, *, observed: Mapping | None = None, num_samples: int, sampler=None,
               intervals: Mapping | None = None, guidance=None, batch_size: int = 2_000,
               model_kwargs: Mapping | None = None, return_deterministic: bool = True):
        """Draw from any conditional of the model: ``p(latent sites | observed, intervals)``.

        Args:
            rng_key: a JAX PRNG key; the same key gives the same samples.
            observed: ``{site: array}`` for any subset of the token sites, each of the
                site's shape; NaN elements are inferred. Empty or ``None``: the joint. A
                batch of observations: give sites a leading axis,
                ``(num_observations, *site shape)`` (sites without it are shared by all).
            num_samples: number of draws (per observation).
            sampler: overrides the default sampler (``self.sampler``; for interval queries
                :class:`~numpyro_simformer.samplers.GuidedEulerMaruyama`).
            intervals: ``{site: (low, high)}``, conditions ``low <= x <= high`` by guided
                diffusion; ``low``/``high`` scalars or arrays of the site's shape, ``None``
                or infinite for an open side. Constrained elements are inferred; they must
                not also be observed exactly. See ``docs/intervals.md``.
            guidance: how intervals steer the score:
                :class:`~numpyro_simformer.samplers.guidance.GaussianIntervalGuidance`
                (default) or ``SigmoidIntervalGuidance`` (the paper's).
            batch_size: samples per jitted call (bounds memory). Observations of a batch
                are vmapped together, ``batch_size // min(batch_size, num_samples)`` per call.
            model_kwargs: keyword arguments of the model for this query, for a Simformer
                with ``coordinates`` or ``exchangeable`` dims: new coordinates (observe a
                series at 4 times, predict it at 200) or a new plate size. The model is
                re-traced with them; ``observed`` then takes the new shapes.
            return_deterministic: add the model's ``numpyro.deterministic`` sites to
                ``posterior``, computed from each draw's token sites by re-running the model
                (as ``numpyro.infer.Predictive`` does). A deterministic site that also
                depends on sites outside the tokens (``exclude_sites``) is left out, with a
                warning, and named in the root's ``deterministic_sites_not_returned``.
                ``False`` skips the model runs (an expensive deterministic, e.g. an ODE
                solution on a fine grid).

        Returns:
            An ``xarray.DataTree`` with groups ``posterior`` (inferred sites with children,
            and the deterministic sites), ``posterior_predictive`` (inferred sites without
            children) and
            ``observed_data`` (with ``{site}_lower``/``{site}_upper`` for intervals); dims
            ``(chain, draw, *site dims)``, or ``(chain, draw, observation, *site dims)``
            for a batch of observations. Observation ``i`` of a batch equals the unbatched
            query with key ``jax.random.fold_in(rng_key, i)`` (under
            ``interval_sites="reject"``, only when no draw had to be redrawn; otherwise
            in distribution). Under ``interval_sites="reject"`` the root's attrs
            ``draws_outside_support`` and ``support_acceptance`` count the draws
            rejected and the share kept (one entry per observation of a batch).
        """
        check_rng_key(rng_key, "Simformer.sample")
        if not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self._check_fitted("sample")
        query = self._query(model_kwargs)
        values, condition_mask, num_observations = batched_observed_tokens(
            query.layout, observed, excluded_sites=self.exclude_sites
        )
        bounds = interval_bounds(query.layout, query.transform, intervals, condition_mask,
                                 excluded_sites=self.exclude_sites)
        if sampler is None:
            sampler = self.sampler if bounds is None else GuidedEulerMaruyama()
        params = self.params
        if bounds is not None:
            params = (params, IntervalBounds(jnp.asarray(bounds.z_lower), jnp.asarray(bounds.z_upper)))
        z_observed = to_z_checked(query.layout, query.transform, values, condition_mask)
        if guidance is not None and bounds is None:
            raise ValueError("`guidance` steers interval conditions: pass `intervals=` with it, or leave it out.")
        if bounds is not None and guidance is None:
            guidance = GaussianIntervalGuidance()
        options = dict(params=params, guidance=guidance if bounds is not None else None, query=query)
        plan = None
        if num_observations is None and bounds is None:
            plan = self._split_plan(query, condition_mask[0])

        def draw(key, count):  # (draw, observation, token) in z-space
            if plan is not None:
                return self._sample_z_split(key, sampler, query, plan, z_observed[0], condition_mask[0], count,
                                            batch_size)[:, None]
            if num_observations is None:
                return self._sample_z(key, sampler, z_observed[0], condition_mask[0], count, batch_size,
                                      **options)[:, None]
            return jnp.swapaxes(self._sample_z_batched(key, sampler, z_observed, condition_mask, count, batch_size,
                                                       **options), 0, 1)

        z_bounds = query.transform.z_bounds()
        if z_bounds is None:
            z, support = draw(rng_key, num_samples), None
        else:
            z, drawn, inside = draws_in_support(draw, rng_key, num_samples, *z_bounds, ~np.asarray(condition_mask),
                                                describe=lambda index: self._bounded_latent(query, condition_mask[index]))
            support = (drawn, inside)
        warn_extrapolation(query.layout, z, condition_mask)
        tokens = np.asarray(jax.jit(query.transform.from_z)(z), dtype=np.float64)
        tokens = np.where(condition_mask, values, tokens)
        if num_observations is None:
            tokens, values = tokens[:, 0], values[0]
        observed_names = [] if observed is None else list(observed)
        deterministic_key = jax.random.fold_in(rng_key, _DETERMINISTIC_STREAM) if return_deterministic else None
        tree = self._to_datatree(tokens[None], observed_names, values, condition_mask, sampler,
                                 batched=num_observations is not None, intervals=bounds, query=query,
                                 deterministic_key=deterministic_key)
        if bounds is not None:
            tree.attrs["guidance"] = repr(guidance)
        if support is not None:  # interval_sites="reject": what was redrawn
            drawn, inside = support if num_observations is not None else (support[0][0], support[1][0])
            tree.attrs["draws_outside_support"] = np.asarray(drawn - inside).tolist()
            tree.attrs["support_acceptance"] = np.asarray(inside / drawn).tolist()
        return tree

    def _bounded_latent(self, query, condition_mask) -> str:
        """The latent sites of a query that draws can leave (``interval_sites="reject"``)."""
        bounded = np.isfinite(query.transform.z_bounds()[0]) & ~np.asarray(condition_mask)
        site_index = query.layout.site_of_token()
        names = dict.fromkeys(query.layout.sites[site_index[token]].name for token in np.flatnonzero(bounded))
        return "latent bounded sites " + ", ".join(repr(name) for name in names)

    def log_prob(self, values: Mapping, *, observed: Mapping | None = None, rng_key=None, density=None,
                 batch_size: int = 1_000, model_kwargs: Mapping | None = None,
                 support_draws: int = 4_000) -> np.ndarray:
        """Log density of any conditional, ``log p(values | observed)``, in the user's space.

        Integrates the probability-flow ODE with its divergence and adds the Jacobians of the
        unconstrained transform and the z-scoring (:mod:`numpyro_simformer.density`).

        Args:
            values: ``{site: array (num_points, *site shape)}`` for every site with an
                unobserved element (elements that are observed are ignored).
            observed: ``{site: array}`` as in :meth:`sample` (one observation; NaN = latent).
            rng_key: needed for Hutchinson's estimator (more latent tokens than
                ``density.exact_trace_max_dim``) and, under ``interval_sites="reject"``,
                for the share of the network's mass inside the support.
            density: a :class:`~numpyro_simformer.density.ProbabilityFlowLogDensity`.
            batch_size: points per jitted call.
            model_kwargs: the model's keyword arguments for this query, as in :meth:`sample`.
            support_draws: under ``interval_sites="reject"`` with a bounded site latent,
                the density is the network's restricted to the support, so it is divided
                by the share ``p`` of the network's mass inside, estimated from this many
                draws of the probability-flow ODE that ``density`` integrates (standard
                error of ``log p`` about ``sqrt((1 - p) / (support_draws p))``). Unused
                otherwise.

        Returns:
            float64 array (num_points,): the log density at each point (``-inf`` outside the
            support). Example: ``sf.log_prob({"theta": thetas}, observed={"x": x_o})``.
        """
        from numpyro_simformer.density import ProbabilityFlowLogDensity, conditional_log_prob, points_to_tokens

        self._check_fitted("log_prob")
        if rng_key is not None:
            check_rng_key(rng_key, "Simformer.log_prob")
        density = ProbabilityFlowLogDensity() if density is None else density
        if not isinstance(density, ProbabilityFlowLogDensity):
            raise TypeError(f"`density` must be a ProbabilityFlowLogDensity, got {type(density).__name__}.")
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        query = self._query(model_kwargs)
        observed_values, condition_mask = observed_tokens(query.layout, observed, excluded_sites=self.exclude_sites)
        z_observed = to_z_checked(query.layout, query.transform, observed_values, condition_mask)  # in support
        tokens = points_to_tokens(query.layout, values, observed_values, condition_mask)
        slices = query.layout.slices()
        reflected = [site.name for site, bijection in zip(query.layout.sites, query.transform.bijections)
                     if isinstance(bijection, IntervalReflect) and not condition_mask[slices[site.name]].all()]
        if reflected:
            raise NotImplementedError(
                f"Sites {reflected} are latent and use interval_sites='reflect', whose fold at the bounds is not "
                "one-to-one: there is no log density to change variables with. For densities, fit with "
                "interval_sites='reject' (the network's density restricted to the support) or 'transform'."
            )
        z_bounds = query.transform.z_bounds()
        bounded_latent = z_bounds is not None and bool(np.any(np.isfinite(z_bounds[0]) & ~condition_mask))
        if bounded_latent and rng_key is None:
            raise ValueError(
                f"With interval_sites='reject' and {self._bounded_latent(query, condition_mask)} latent, the log "
                "density is renormalised by the share of the network's draws inside the support, estimated by "
                "sampling: pass `rng_key`."
            )
        if density not in query.log_prob_fns:
            query.log_prob_fns[density] = jax.jit(density.build(query.score_fn, self.sde), static_argnames="exact")
        log_density = conditional_log_prob(
            rng_key, query.log_prob_fns[density], self.params, query.transform, tokens, condition_mask,
            exact_trace_max_dim=density.exact_trace_max_dim, num_probes=density.num_probes, batch_size=batch_size,
        )
        if not bounded_latent:
            return log_density
        if not isinstance(support_draws, (int, np.integer)) or support_draws <= 0:
            raise ValueError(f"`support_draws` must be a positive integer, got {support_draws!r}.")
        from numpyro_simformer.samplers import ProbabilityFlowODE

        # The normaliser from the flow the density integrates: its solver and tolerances.
        flow = ProbabilityFlowODE(solver=density.solver, num_steps=density.num_steps, rtol=density.rtol,
                                  atol=density.atol, max_steps=density.max_steps, final_denoise=False)
        z = self._sample_z(jax.random.fold_in(rng_key, SUPPORT_STREAM), flow, z_observed,
                           condition_mask, support_draws, batch_size, query=query)
        acceptance = float(np.mean(inside_support(np.asarray(z)[:, None], *z_bounds, ~condition_mask[None])))
        if acceptance == 0.0:
            raise RuntimeError(
                f"None of {support_draws} draws of the network lies inside the support of the "
                f"{self._bounded_latent(query, condition_mask)}: the restricted density is undefined here. "
                "Use interval_sites='transform' for this model."
            )
        return log_density - np.log(acceptance)

    def _sample_z(self, rng_key, sampler, z_observed, condition_mask, num_samples, batch_size, *,
                  params=None, guidance=None, query=None):
        """(num_samples, num_tokens) in z-space for one observation."""
        chunk = min(batch_size, num_samples)
        num_chunks = -(-num_samples // chunk)
        sample_fn = self._sample_fn(sampler, chunk, guidance, query=query)
        params = self.params if params is None else params
        keys = jax.random.split(rng_key, num_chunks)
        bar, parts = self._sampling_bar(num_chunks), []
        for key in keys:
            parts.append(sample_fn(key, params, jnp.asarray(z_observed), jnp.asarray(condition_mask)))
            if bar is not None:
                jax.block_until_ready(parts[-1])
                bar.update()
        if bar is not None:
            bar.close()
        return jnp.concatenate(parts)[:num_samples]

    def _split_plan(self, query, condition_mask):
        """How to answer a query with more positions along a variable dim than training saw.

        Training shows at most ``points_per_dim`` positions per variable dim. When a query
        asks for more latent ones (a series predicted at 200 times) and those latent
        variable tokens are conditionally independent given the rest (no two adjacent in the
        attention mask, and every neighbour a token on no variable dim), the query splits
        exactly: first the other latent tokens given the observations (the many latent
        ones marginalised, i.e. left out), then, for each draw, the latent variable tokens
        in chunks of ``points_per_dim``, each given that draw's non-variable tokens.

        Returns ``None`` (answer in one pass) or ``(first, fixed, chunks)``: token indices
        of the first pass, of the tokens on no variable dim (each chunk's condition), and a
        list of index arrays, one per chunk.
        """
        variable = query.variable
        if variable is None:
            return None
        from numpyro_simformer.variable import variable_token_mask

        on_variable = variable_token_mask(query.layout, variable)
        latent_variable = np.flatnonzero(on_variable & ~np.asarray(condition_mask))
        if latent_variable.size == 0 or max(variable.sizes(query.layout.sites).values()) <= self.points_per_dim:
            return None
        adjacent = query.attention_mask | query.attention_mask.T
        np.fill_diagonal(adjacent, False)
        neighbours = adjacent[latent_variable]
        if (neighbours & on_variable[None]).any():
            return None  # coupled series: no exact split; one pass
        first = np.setdiff1d(np.arange(query.layout.num_tokens), latent_variable)
        fixed = np.flatnonzero(~on_variable)  # the chunks' only neighbours
        size = self.points_per_dim
        chunks = [latent_variable[start:start + size] for start in range(0, latent_variable.size, size)]
        return first, fixed, chunks

    def _sub_sample_fn(self, sampler, num_tokens: int, batched: bool):
        """A jitted sampler over a token subset: ``fn(key, (params, node_ids, coordinates, mask), values, ...)``.

        The subset's identities and attention mask are arguments, so every chunk of one
        size shares one compiled function.
        """
        key = ("subset", sampler, num_tokens, batched)
        if key not in self._sample_fns:

            def denoiser_fn(packed, values, time, condition_mask):
                params, node_ids, coordinates, attention_mask = packed
                return self._denoiser_fn(params, values, time, condition_mask, coordinates=coordinates,
                                         attention_mask=attention_mask, node_ids=node_ids)

            sample_fn = sampler.build(build_score_fn(denoiser_fn, self.sde), self.sde)
            if batched:  # one draw per row of observed values
                one = lambda rng_key, packed, values, mask: sample_fn(rng_key, packed, values, mask, 1)[0]
                self._sample_fns[key] = jax.jit(jax.vmap(one, in_axes=(0, None, 0, None)))
            else:
                self._sample_fns[key] = jax.jit(sample_fn, static_argnums=4)
        return self._sample_fns[key]

    def _packed(self, query, tokens):
        mask = np.asarray(query.attention_mask)[np.ix_(tokens, tokens)]
        return (self.params, jnp.asarray(query.layout.node_ids[tokens]), jnp.asarray(query.layout.coordinates[tokens]),
                jnp.asarray(mask))

    def _sample_z_split(self, rng_key, sampler, query, plan, z_observed, condition_mask, num_samples, batch_size):
        """(num_samples, num_tokens) in z-space by the split of :meth:`_split_plan`."""
        first, fixed, chunks = plan
        key_first, key_chunks = jax.random.split(rng_key)
        first_fn, packed = self._sub_sample_fn(sampler, first.size, batched=False), self._packed(query, first)
        chunk = min(batch_size, num_samples)
        parts = [first_fn(key, packed, jnp.asarray(z_observed[first]), jnp.asarray(condition_mask[first]), chunk)
                 for key in jax.random.split(key_first, -(-num_samples // chunk))]
        z = np.repeat(np.asarray(z_observed)[None], num_samples, axis=0)
        z[:, first] = np.asarray(jnp.concatenate(parts)[:num_samples])
        bar = self._sampling_bar(len(chunks))
        for index, latent in enumerate(chunks):
            tokens = np.concatenate([fixed, latent])
            chunk_mask = np.concatenate([np.ones(fixed.size, bool), np.zeros(latent.size, bool)])
            sample_fn, packed = self._sub_sample_fn(sampler, tokens.size, batched=True), self._packed(query, tokens)
            keys = jax.random.split(jax.random.fold_in(key_chunks, index), num_samples)
            draws = []
            for start in range(0, num_samples, batch_size):
                rows = slice(start, start + batch_size)
                draws.append(sample_fn(keys[rows], packed, jnp.asarray(z[rows][:, tokens]), jnp.asarray(chunk_mask)))
            z[:, latent] = np.asarray(jnp.concatenate(draws))[:, fixed.size:]
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return jnp.asarray(z)

    def _sampling_bar(self, num_calls: int):
        """A tqdm bar over jitted sampling calls, when ``progress_bar`` is on and there are several."""
        if not self.progress_bar or num_calls < 2:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=num_calls, desc="sampling", unit="call")

    def _sample_z_batched(self, rng_key, sampler, z_observed, condition_mask, num_samples, batch_size, *,
                          params=None, guidance=None, query=None):
        """(num_observations, num_samples, num_tokens), vmapped over observations.

        Observation i draws with ``fold_in(rng_key, i)``, split into chunk keys exactly as
        :meth:`_sample_z` splits its key, so it equals the unbatched query with that key.
        """
        chunk = min(batch_size, num_samples)
        num_chunks = -(-num_samples // chunk)
        num_observations = z_observed.shape[0]
        group = min(num_observations, max(1, batch_size // chunk))
        sample_fn = self._sample_fn(sampler, chunk, guidance, batched=True, query=query)
        params = self.params if params is None else params
        keys = jnp.stack([jax.random.split(jax.random.fold_in(rng_key, index), num_chunks)
                          for index in range(num_observations)])
        padded = -(-num_observations // group) * group
        pad = lambda array: np.concatenate([array, np.repeat(array[-1:], padded - num_observations, axis=0)])
        keys, z_observed, condition_mask = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - num_observations, 0)]), \
            pad(np.asarray(z_observed)), pad(np.asarray(condition_mask))
        results, bar = [], self._sampling_bar(padded // group)
        for start in range(0, padded, group):
            rows = slice(start, start + group)
            parts = [
                sample_fn(keys[rows, index], params, jnp.asarray(z_observed[rows]), jnp.asarray(condition_mask[rows]))
                for index in range(num_chunks)
            ]
            results.append(jnp.concatenate(parts, axis=1)[:, :num_samples])
            if bar is not None:
                jax.block_until_ready(results[-1])
                bar.update()
        if bar is not None:
            bar.close()
        return jnp.concatenate(results)[:num_observations]

    def _to_datatree(self, tokens, observed_names, observed_values, condition_mask, sampler, *,
                     batched: bool = False, intervals=None, query=None, deterministic_key=None):
        """``tokens``: (chain, draw, [observation,] num_tokens); ``observed_values``:
        ([observation,] num_tokens) with NaN where latent; ``condition_mask`` (..., num_tokens).
        ``deterministic_key``: computes the deterministic sites with it (``None``: none)."""
        query = self._default_query if query is None else query
        layout = query.layout
        unflat = layout.unflatten(tokens)
        site_values = {site.name: np.rint(unflat[site.name]).astype(np.int64) if site.is_discrete
                       else np.asarray(unflat[site.name]) for site in layout.sites}
        deterministic, not_returned = {}, []
        if deterministic_key is not None:
            deterministic, not_returned = self._deterministic(deterministic_key, query, site_values, tokens.ndim - 1)
        slices = layout.slices()
        condition_mask = np.reshape(condition_mask, (-1, layout.num_tokens))
        inferred = [site for site in layout.sites if not condition_mask[:, slices[site.name]].all()]
        samples = {site.name: site_values[site.name] for site in inferred}
        observed_sites = layout.unflatten(np.asarray(observed_values, dtype=np.float64))
        observed_data = {name: observed_sites[name] for name in observed_names}
        extra_dims = ("observation",) if batched else ()
        attrs = {
            "inference_library": "numpyro_simformer",
            "inference_library_version": __version__,
            "sampler": repr(sampler),
            "num_simulations": int(self.simulation_info.num_valid),
        }
        if not_returned:
            attrs["deterministic_sites_not_returned"] = not_returned
        if intervals is not None:
            attrs["interval_sites"] = [name for name in layout.site_names
                                       if intervals.interval_mask[slices[name]].any()]
            for name in attrs["interval_sites"]:
                site = layout.site(name)
                for side, bound in (("lower", intervals.lower), ("upper", intervals.upper)):
                    value = bound[slices[name]].reshape(site.shape)
                    observed_data[f"{name}_{side}"] = np.broadcast_to(value, tokens.shape[2:-1] + site.shape)
        tree = to_datatree(
            layout,
            samples,
            {name: value for name, value in observed_data.items() if name in slices},
            [site.name for site in inferred if self._has_children[site.name]],
            [site.name for site in inferred if not self._has_children[site.name]],
            attrs=attrs,
            extra_dims=extra_dims,
            coords=query.coordinates,
            deterministic=deterministic,
        )
        return _add_bounds(tree, layout, observed_data, extra_dims)

    def _deterministic(self, rng_key, query, site_values, batch_ndim):
        """``({name: (values, dims)}, not_returned)``: the model's deterministic sites per draw."""
        from numpyro_simformer.deterministic import deterministic_values, read_deterministic

        kwargs = self._model_kwargs if query.model_kwargs is None else query.model_kwargs
        if query.deterministic is None:
            query.deterministic = read_deterministic(self.model, self._model_args, kwargs, query.layout.site_names)
        dims, random_outside = query.deterministic
        if not dims:
            return {}, []
        values, not_returned = deterministic_values(rng_key, self.model, self._model_args, kwargs, site_values,
                                                    dims, batch_ndim, random_outside)
        if not_returned:
            warnings.warn(
                f"Deterministic site(s) {not_returned} depend on sites outside the tokens (exclude_sites="
                f"{list(self.exclude_sites)}), so the answer cannot fix them; they are not returned. Make those "
                "sites tokens to get them.", stacklevel=4)
        return {name: (value, dims[name]) for name, value in values.items()}, not_returned


# fold_in data for the key of the deterministic sites: the sampling key stays as it was
_DETERMINISTIC_STREAM = 0x64657465


class _Query:
    """What one query layout needs: tokens, transform, score function and compiled samplers."""

    def __init__(self, layout, transform, score_fn, sample_fns, log_prob_fns, coordinates, attention_mask=None,
                 variable=None, model_kwargs=None):
        self.layout, self.transform, self.score_fn = layout, transform, score_fn
        self.sample_fns, self.log_prob_fns = sample_fns, log_prob_fns
        self.coordinates = coordinates  # {dim: values} for the DataTree
        self.attention_mask = attention_mask
        self.variable = variable
        self.model_kwargs = model_kwargs  # None: the training keyword arguments
        self.deterministic = None  # ({name: dims}, random_outside) of the model, read on first use


def _add_bounds(tree, layout, observed_data, extra_dims):
    """Put the interval bounds (``{site}_lower``, ``{site}_upper``) into ``observed_data``."""
    import xarray as xr

    names = {site.name for site in layout.sites}
    bounds = {}
    for name, value in observed_data.items():
        if name in names:
            continue
        site = layout.site(name.rsplit("_", 1)[0])
        bounds[name] = xr.DataArray(np.asarray(value, dtype=np.float64), dims=[*extra_dims, *site.dims])
    if not bounds:
        return tree
    if "observed_data" in tree.children:
        dataset = tree["observed_data"].to_dataset().assign(bounds)
    else:
        dataset = xr.Dataset(bounds)
    tree["observed_data"] = dataset
    return tree
