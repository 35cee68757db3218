"""The front object: a NumPyro model in, a trained Simformer out, any conditional back.

The shell only wires the functional core: :func:`~numpyro_simformer.model.spec.read_model_spec`
reads the model once, :func:`~numpyro_simformer.model.simulate.simulate` draws the joint,
:func:`~numpyro_simformer.training.fit.fit_state` trains and returns one immutable
:class:`~numpyro_simformer.training.state.FittedState` (``sf.state``), and every query goes through
:mod:`numpyro_simformer.inference` (validate and convert once, draw with one driver, build
the DataTree in one place).

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

import time as _time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from numpyro_simformer import __version__
from numpyro_simformer._checks import check_fitted, check_positive_int, check_rng_key
from numpyro_simformer.diffusion.masks import ConditionMaskDistribution
from numpyro_simformer.diffusion.sde import VESDE
from numpyro_simformer.inference.density import ProbabilityFlowLogDensity, conditional_log_prob, points_to_tokens
from numpyro_simformer.inference.driver import QuerySpace, draw_z
from numpyro_simformer.inference.output import answer_tree, deterministic_sites, site_values_of
from numpyro_simformer.io.checkpoint import read_checkpoint, save_simformer
from numpyro_simformer.io.serialization import ensure_writable_directory
from numpyro_simformer.inference.query import build_query, observed_tokens, to_z_checked
from numpyro_simformer.inference.rejection import SUPPORT_STREAM, draws_in_support, inside_support
from numpyro_simformer.model.executors import SimulationReport, check_executor, simulate_chunks
from numpyro_simformer.model.simulate import SimulationInfo, filter_finite, simulate
from numpyro_simformer.model.spec import ModelOptions, ModelSpec, read_model_spec
from numpyro_simformer.nn import NetworkConfig
from numpyro_simformer.samplers import EulerMaruyama, GuidedEulerMaruyama, ProbabilityFlowODE
from numpyro_simformer.samplers.guidance import GaussianIntervalGuidance
from numpyro_simformer.training.state import FittedState, describe_state
from numpyro_simformer.tokens.transforms import DISCRETE_SITES, INTERVAL_SITES, IntervalReflect, warn_extrapolation
from numpyro_simformer.training.fit import fit_state
from numpyro_simformer.training.loop import TrainingConfig
from numpyro_simformer.training.parallel import resolve_devices

__all__ = ["Simformer"]

# fold_in data for the key of the deterministic sites: the sampling key stays as it was
_DETERMINISTIC_STREAM = 0x64657465


class Simformer:
    """Simulation-based inference for a NumPyro model with one transformer for every conditional.

    Args:
        model: a NumPyro model. Its unobserved sample sites are the tokens: one token per
            scalar element. Parameters are sites with children in the model graph, data
            are sites without children.
        num_simulations: joint draws used for training by :meth:`fit`.
        network: a :class:`~numpyro_simformer.nn.NetworkConfig`. Its default depth
            follows the model: 3 attention layers up to 8 tokens, 6 above
            (:func:`~numpyro_simformer.nn.default_num_layers`).
        sde: the diffusion, :class:`~numpyro_simformer.diffusion.sde.VESDE` (default) or ``VPSDE``.
        training: a :class:`~numpyro_simformer.TrainingConfig`.
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
        simulation_chunk_size: draws per jitted simulation call; with ``simulation_executor``
            or ``simulation_dir``, also the unit of work handed to a worker and kept on disk
            (several chunks per worker keep them busy). The draws of a vectorized
            ``Simulator.from_numpy`` site depend on it, never on the executor.
        simulation_executor: where the simulation chunks run: ``None`` (this process), a
            number of local worker processes (a process pool the library starts, and
            restarts if a worker dies), or any ``concurrent.futures.Executor``, e.g. a
            ``concurrent.futures.ProcessPoolExecutor`` or a Dask ``client.get_executor()``.
            The simulations are the same for the same key whatever runs them. See
            ``docs/bring-your-own-simulator.md``, "Expensive simulators".
        simulation_dir: a folder in which every finished simulation chunk is kept as an
            ``.npz`` file as it arrives; a fit with the same key, ``num_simulations`` and
            chunk size resumes from it (only missing chunks are simulated), and
            :func:`~numpyro_simformer.read_simulations` reads it for :meth:`fit_simulations`.
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
        discrete_sites: how sites with a discrete support (Poisson, Bernoulli, a
            ``Simulator`` with ``support=constraints.boolean``) are trained.
            ``"dequantize"`` (default): a latent integer is blurred by Gaussian noise of an
            eighth of the integers' spacing (drawn afresh for every example), so the network
            learns a smooth density instead of the scores of point masses; observed integers
            stay exact, as queries give them, and rounding a draw returns its integer.
            ``"integers"``: trained on the integers themselves (the only way before this
            option), whose scores grow without bound as the noise vanishes and crowd out
            the rest of the model. Both return integers and answer queries the same way;
            only training differs. Measured in ``docs/benchmarks.md``.
        elements_per_token: how many elements of a site share one token. ``None``
            (default): a site of more than 32 elements is cut into at most 32 tokens
            (``ceil(size / 32)`` elements each, elements with the same parents side by
            side), smaller sites keep one element per token; an int for every site; or
            ``{site: k}`` for some sites (the others automatic). Grouping changes the cost
            of training and queries (attention over fewer tokens), never what a query
            means: observed, missing and interval elements inside a token work as before.
            Models with ``coordinates`` or ``exchangeable`` dims keep one element per
            token. See ``docs/high-dimensional.md``.
        progress_bar: show progress bars for simulation, training (loss, steps/s, time
            left) and sampling (when a query takes several jitted calls).

    Attributes:
        state: the :class:`~numpyro_simformer.training.state.FittedState` after :meth:`fit` (``None``
            before); ``spec``, ``layout``, ``parents``, ``attention_mask``, ``transform``,
            ``params``, ``history``, ``simulation_info``, ``simulation_time`` and
            ``training_time`` read it.
        simulation_report: the :class:`~numpyro_simformer.SimulationReport` of the last
            :meth:`simulate` over an executor or into a directory (chunks reused, simulated,
            rerun, failed); ``None`` otherwise. Not part of the state: it describes a run.
        model_options: the :class:`~numpyro_simformer.model.spec.ModelOptions` the model is read with.
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
        simulation_executor=None,
        simulation_dir=None,
        coordinates: Mapping[str, str] | None = None,
        exchangeable: Sequence[str] = (),
        points_per_dim: int = 20,
        interval_sites: str = "transform",
        discrete_sites: str = "dequantize",
        elements_per_token: int | Mapping[str, int] | None = None,
        progress_bar: bool = True,
    ):
        if not callable(model):
            raise TypeError(f"`model` must be a NumPyro model (a callable), got {type(model).__name__}.")
        check_positive_int(num_simulations, "num_simulations")
        check_positive_int(points_per_dim, "points_per_dim")
        if interval_sites not in INTERVAL_SITES:
            raise ValueError(f"`interval_sites` must be one of {INTERVAL_SITES}, got {interval_sites!r}.")
        if discrete_sites not in DISCRETE_SITES:
            raise ValueError(f"`discrete_sites` must be one of {DISCRETE_SITES}, got {discrete_sites!r}.")
        self.model_options = ModelOptions(
            attention=attention, parents=parents, token_sites=token_sites, exclude_sites=exclude_sites,
            data_sites=data_sites, coordinates=coordinates, exchangeable=exchangeable,
            elements_per_token=elements_per_token,
        )
        self.model = model
        self.num_simulations = int(num_simulations)
        self.network_config = network
        self.sde = sde
        self.training_config = training
        self.sampler = sampler
        self.condition_masks = condition_masks
        self.simulation_chunk_size = int(simulation_chunk_size)
        self.simulation_executor = check_executor(simulation_executor, "simulation_executor")
        self.simulation_dir = simulation_dir
        self.simulation_report: SimulationReport | None = None
        self.points_per_dim = int(points_per_dim)
        self.interval_sites = interval_sites
        self.discrete_sites = discrete_sites
        self.progress_bar = progress_bar
        self.state: FittedState | None = None
        self._spaces: dict = {}

    def __repr__(self) -> str:
        """What the fit read and trained: sites, tokens, attention, network, simulations, training."""
        name = getattr(self.model, "__name__", type(self.model).__name__)
        head = f"Simformer(model={name}, num_simulations={self.num_simulations:,})"
        if self.state is None:
            return f"{head}: not fitted"
        return "\n".join([f"{head}: fitted", *(f"  {key:<12} {text}" for key, text in describe_state(self.state))])

    # ------------------------------------------------------------------ options, read back
    @property
    def attention(self):
        return self.model_options.attention

    @property
    def token_sites(self) -> list[str] | None:
        sites = self.model_options.token_sites
        return None if sites is None else list(sites)

    @property
    def exclude_sites(self) -> list[str]:
        return list(self.model_options.exclude_sites)

    @property
    def data_sites(self) -> list[str] | None:
        sites = self.model_options.data_sites
        return None if sites is None else list(sites)

    @property
    def coordinates(self) -> dict:
        return dict(self.model_options.coordinates)

    @property
    def exchangeable(self) -> tuple[str, ...]:
        return tuple(self.model_options.exchangeable)

    # ------------------------------------------------------------------ the fitted state, read back
    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`fit_simulations`, :meth:`load`) has run."""
        return self.state is not None

    def _fitted_state(self, method: str) -> FittedState:
        check_fitted(self, method)
        return self.state

    spec = property(lambda self: self._fitted_state("spec").spec, doc="The fitted :class:`ModelSpec`.")
    layout = property(lambda self: self._fitted_state("layout").spec.layout, doc="The token layout.")
    parents = property(lambda self: self._fitted_state("parents").spec.parents,
                       doc="bool (num_tokens, num_tokens): ``[i, j]`` True when token j is a parent of token i.")
    attention_mask = property(lambda self: self._fitted_state("attention_mask").spec.attention_mask,
                              doc="bool (num_tokens, num_tokens): True where token i may attend to token j.")
    variable_dims = property(lambda self: self._fitted_state("variable_dims").spec.variable_dims,
                             doc="The variable-size dims (coordinates, exchangeable plates), or ``None``.")
    transform = property(lambda self: self._fitted_state("transform").transform, doc="The token transform.")
    params = property(lambda self: self._fitted_state("params").params, doc="The trained (EMA) weights.")
    history = property(lambda self: self._fitted_state("history").history, doc="The training history.")
    simulation_info = property(lambda self: self._fitted_state("simulation_info").simulation_info,
                               doc="Counts of the simulations (requested, valid, invalid).")
    simulation_time = property(lambda self: self._fitted_state("simulation_time").simulation_time,
                               doc="Seconds spent simulating.")
    training_time = property(lambda self: self._fitted_state("training_time").training_time,
                             doc="Seconds spent training.")

    # ------------------------------------------------------------------ fitting
    def read_model(self, rng_key, *model_args, **model_kwargs) -> ModelSpec:
        """Read the model at its arguments into a :class:`ModelSpec` (sites, graph, masks), without fitting.

        :meth:`fit` does this first with ``jax.random.split(rng_key, 3)[0]``; pass the
        spec to :meth:`fit_simulations` (``spec=``) to reuse it.
        """
        check_rng_key(rng_key, "Simformer.read_model")
        return read_model_spec(rng_key, self.model, model_args, model_kwargs, self.model_options)

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
        spec = read_model_spec(key_read, self.model, model_args, model_kwargs, self.model_options, simulating=True)
        draws, info, seconds = self.simulate(key_simulate, spec)
        self._set_state(fit_state(key_train, spec, draws, info, simulation_time=seconds, **self._fit_options()))
        return self

    def simulate(self, rng_key, spec: ModelSpec) -> tuple[dict[str, np.ndarray], SimulationInfo, float]:
        """``num_simulations`` joint draws of ``spec``'s token sites.

        With ``simulation_executor`` or ``simulation_dir`` the chunks run through
        :func:`~numpyro_simformer.model.executors.simulate_chunks` (same draws) and
        :attr:`simulation_report` says what happened to each.

        Returns:
            ``(draws, info, seconds)``: ``{site: array (num_valid, *site shape)}`` (finite
            rows only), a :class:`~numpyro_simformer.model.simulate.SimulationInfo`, and the
            time it took.

        Raises:
            ~numpyro_simformer.SimulationError: chunks failed (the simulator raised, or a
                worker kept dying); the finished ones are kept in ``simulation_dir``.
        """
        start = _time.perf_counter()
        arguments = (rng_key, spec.model, self.num_simulations, spec.layout.site_names, spec.model_args,
                     spec.model_kwargs)
        options = dict(chunk_size=self.simulation_chunk_size, progress_bar=self.progress_bar,
                       data_parallel=resolve_devices(self.training_config.data_parallel))
        if self.simulation_executor is None and self.simulation_dir is None:
            draws, info = simulate(*arguments, **options)
            self.simulation_report = None
        else:
            if self.simulation_executor is not None:
                options["data_parallel"] = None  # workers simulate on their own devices
            draws, info, self.simulation_report = simulate_chunks(
                *arguments, executor=self.simulation_executor, directory=self.simulation_dir, **options)
        return draws, info, _time.perf_counter() - start

    def fit_simulations(self, rng_key, simulations: Mapping[str, np.ndarray], *model_args,
                        spec: ModelSpec | None = None, **model_kwargs) -> "Simformer":
        """Train on simulations the user already has.

        Args:
            rng_key: a JAX PRNG key.
            simulations: ``{site: array (num_simulations, *site.shape)}`` for every token
                site. Rows with a NaN or inf are dropped and counted.
            *model_args, **model_kwargs: passed to the model (read for its sites and graph).
            spec: the model already read (:meth:`read_model`) at these arguments; the
                model is then not read again.
        """
        check_rng_key(rng_key, "Simformer.fit_simulations")
        ensure_writable_directory(self.training_config.checkpoint_dir, "TrainingConfig.checkpoint_dir")
        key_read, key_train = jax.random.split(rng_key)
        if spec is None:
            spec = read_model_spec(key_read, self.model, model_args, model_kwargs, self.model_options)
        elif not isinstance(spec, ModelSpec):
            raise TypeError(f"`spec` must be a ModelSpec from `read_model`, got {type(spec).__name__}.")
        if not isinstance(simulations, Mapping):
            raise TypeError(f"`simulations` must be a dict of site arrays, got {type(simulations).__name__}.")
        layout = spec.layout
        missing = [name for name in layout.site_names if name not in simulations]
        if missing:
            raise ValueError(f"`simulations` lacks the token sites {missing}; it must hold every one of {layout.site_names}.")
        lengths = set()
        for site in layout.sites:
            value = np.asarray(simulations[site.name])
            if value.shape[1:] != site.shape:
                raise ValueError(
                    f"simulations[{site.name!r}] has shape {value.shape}; expected "
                    f"(num_simulations, *{site.shape})."
                )
            lengths.add(value.shape[0])
        if len(lengths) != 1:
            raise ValueError(f"The sites of `simulations` have different numbers of rows: {sorted(lengths)}.")
        draws, finite = filter_finite({name: simulations[name] for name in layout.site_names})
        info = SimulationInfo(len(finite), int(finite.sum()), int((~finite).sum()), vectorized=False)
        self._set_state(fit_state(key_train, spec, draws, info, **self._fit_options()))
        return self

    def _fit_options(self) -> dict:
        return dict(network=self.network_config, sde=self.sde, training=self.training_config,
                    condition_masks=self.condition_masks, interval_sites=self.interval_sites,
                    discrete_sites=self.discrete_sites, points_per_dim=self.points_per_dim,
                    progress_bar=self.progress_bar)

    def _set_state(self, state: FittedState) -> None:
        self.state = state
        self._spaces = {}

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, *, overwrite: bool = False):
        """Write the fitted Simformer to the directory ``path``: Orbax weights and a JSON record.

        See :mod:`numpyro_simformer.io.checkpoint` for what is stored; no pickle is used.

        Args:
            path: the directory to create.
            overwrite: replace an existing checkpoint at ``path``.

        Returns:
            The checkpoint's path.
        """
        state = self._fitted_state("save")
        if state.spec.variable_dims is not None:
            raise NotImplementedError(
                "Saving a Simformer with `coordinates` or `exchangeable` dims is not supported yet: the "
                "checkpoint format stores a fixed token layout. Refit it, or train without variable-size dims."
            )
        return save_simformer(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, model: Callable, *model_args, check_model: bool = True, **model_kwargs) -> "Simformer":
        """Rebuild a fitted Simformer from a checkpoint written by :meth:`save` and its model.

        The model is traced with ``model_args``/``model_kwargs``; its sites must match the
        checkpoint's, and (``check_model=True``) so must its element-level graph and its
        draws under a fixed key, so a changed prior or simulator is noticed. Pass
        ``check_model=False`` to load into a model changed on purpose. The loaded object
        gives the same samples for the same key.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            numpyro_simformer.io.checkpoint.CheckpointError: when the checkpoint is
                unreadable, truncated or altered.
            numpyro_simformer.io.checkpoint.ModelMismatchError: when a site of the model
                differs from the checkpoint's (the message names it).
        """
        options, state = read_checkpoint(path, model, model_args, model_kwargs, check_model=check_model)
        sf = cls(model, **options)
        sf._set_state(state)
        return sf

    # ------------------------------------------------------------------ querying
    def query_space(self, model_kwargs: Mapping | None = None) -> QuerySpace:
        """The :class:`~numpyro_simformer.inference.driver.QuerySpace` of queries at ``model_kwargs``.

        ``None`` is the training layout. Otherwise the model is traced with its training
        keyword arguments updated by ``model_kwargs`` (new coordinates, a new plate size),
        and the token layout, graph and attention mask are rebuilt for it. Spaces are cached,
        with their compiled functions: a repeated query compiles nothing.
        """
        state = self._fitted_state("query_space")
        if model_kwargs is None:
            cache_key = None
        else:
            if not isinstance(model_kwargs, Mapping):
                raise TypeError(f"`model_kwargs` must be a dict of the model's keyword arguments, got "
                                f"{type(model_kwargs).__name__}.")
            kwargs = {**state.spec.model_kwargs, **dict(model_kwargs)}
            cache_key = tuple(sorted((name, np.asarray(value).tobytes() if isinstance(value, (np.ndarray, jax.Array))
                                      else repr(value)) for name, value in kwargs.items()))
        if cache_key not in self._spaces:
            if model_kwargs is None:
                spec, transform = state.spec, state.transform
            else:
                spec = state.spec.at(model_kwargs)
                transform = state.transform.on_layout(spec.layout)
            self._spaces[cache_key] = QuerySpace(spec, transform, state.graphdef, state.constants, state.sde,
                                                 self.points_per_dim, num_layers=state.network.num_layers)
        return self._spaces[cache_key]

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
        check_positive_int(num_samples, "num_samples")
        check_positive_int(batch_size, "batch_size")
        state = self._fitted_state("sample")
        space = self.query_space(model_kwargs)
        query = build_query(space.layout, space.transform, observed, intervals,
                            excluded_sites=self.model_options.exclude_sites)
        if guidance is not None and query.intervals is None:
            raise ValueError("`guidance` steers interval conditions: pass `intervals=` with it, or leave it out.")
        params = state.params
        if query.intervals is not None:
            sampler = GuidedEulerMaruyama() if sampler is None else sampler
            guidance = GaussianIntervalGuidance() if guidance is None else guidance
            params = (params, query.intervals.z_bounds())
        sampler = self.sampler if sampler is None else sampler

        def draw(key, count):  # (draw, observation, token) in z-space
            return draw_z(key, space, sampler, params, query.z_observed, query.condition_mask, count,
                          batched=query.batched, batch_size=batch_size, guidance=guidance,
                          progress_bar=self.progress_bar)

        z_bounds = space.transform.z_bounds()
        if z_bounds is None:
            z, support = draw(rng_key, num_samples), None
        else:
            z, drawn, inside = draws_in_support(draw, rng_key, num_samples, *z_bounds, ~query.condition_mask,
                                                describe=lambda index: _bounded_latent(space, query.condition_mask[index]))
            support = (drawn, inside)
        warn_extrapolation(space.layout, z, query.condition_mask)
        tokens = np.asarray(space.transform.from_z_fn(z), dtype=np.float64)
        tokens = np.where(query.condition_mask, query.values, tokens)
        values = query.values
        if not query.batched:
            tokens, values = tokens[:, 0], values[0]
        tokens = tokens[None]  # (chain, draw, [observation,] token)
        attrs = {
            "inference_library": "numpyro_simformer",
            "inference_library_version": __version__,
            "sampler": repr(sampler),
            "num_simulations": int(state.simulation_info.num_valid),
        }
        site_values = site_values_of(space.layout, tokens)  # discrete sites rounded once, for both uses
        deterministic = None
        if return_deterministic:
            deterministic = deterministic_sites(jax.random.fold_in(rng_key, _DETERMINISTIC_STREAM), space, site_values,
                                                tokens.ndim - 1)
        tree = answer_tree(space, tokens, values, query.condition_mask, query.observed_names, attrs=attrs,
                           batched=query.batched, intervals=query.intervals, deterministic=deterministic,
                           site_values=site_values)
        if query.intervals is not None:
            tree.attrs["guidance"] = repr(guidance)
        if support is not None:  # interval_sites="reject": what was redrawn
            drawn, inside = support if query.batched else (support[0][0], support[1][0])
            tree.attrs["draws_outside_support"] = np.asarray(drawn - inside).tolist()
            tree.attrs["support_acceptance"] = np.asarray(inside / drawn).tolist()
        return tree

    def log_prob(self, values: Mapping, *, observed: Mapping | None = None, rng_key=None, density=None,
                 batch_size: int = 1_000, model_kwargs: Mapping | None = None,
                 support_draws: int = 4_000) -> np.ndarray:
        """Log density of any conditional, ``log p(values | observed)``, in the user's space.

        Integrates the probability-flow ODE with its divergence and adds the Jacobians of the
        unconstrained transform and the z-scoring (:mod:`numpyro_simformer.inference.density`).

        Args:
            values: ``{site: array (num_points, *site shape)}`` for every site with an
                unobserved element (elements that are observed are ignored).
            observed: ``{site: array}`` as in :meth:`sample` (one observation; NaN = latent).
            rng_key: needed for Hutchinson's estimator (more latent tokens than
                ``density.exact_trace_max_dim``) and, under ``interval_sites="reject"``,
                for the share of the network's mass inside the support.
            density: a :class:`~numpyro_simformer.inference.density.ProbabilityFlowLogDensity`.
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
        state = self._fitted_state("log_prob")
        if rng_key is not None:
            check_rng_key(rng_key, "Simformer.log_prob")
        density = ProbabilityFlowLogDensity() if density is None else density
        if not isinstance(density, ProbabilityFlowLogDensity):
            raise TypeError(f"`density` must be a ProbabilityFlowLogDensity, got {type(density).__name__}.")
        check_positive_int(batch_size, "batch_size")
        space = self.query_space(model_kwargs)
        layout, transform = space.layout, space.transform
        observed_values, condition_mask = observed_tokens(layout, observed,
                                                          excluded_sites=self.model_options.exclude_sites)
        z_observed = to_z_checked(layout, transform, observed_values, condition_mask)  # in support
        tokens = points_to_tokens(layout, values, observed_values, condition_mask)
        slices = layout.slices()
        reflected = [site.name for site, bijection in zip(layout.sites, transform.bijections)
                     if isinstance(bijection, IntervalReflect) and not condition_mask[slices[site.name]].all()]
        if reflected:
            raise NotImplementedError(
                f"Sites {reflected} are latent and use interval_sites='reflect', whose fold at the bounds is not "
                "one-to-one: there is no log density to change variables with. For densities, fit with "
                "interval_sites='reject' (the network's density restricted to the support) or 'transform'."
            )
        z_bounds = transform.z_bounds()
        bounded_latent = z_bounds is not None and bool(np.any(np.isfinite(z_bounds[0]) & ~condition_mask))
        if bounded_latent and rng_key is None:
            raise ValueError(
                f"With interval_sites='reject' and {_bounded_latent(space, condition_mask)} latent, the log "
                "density is renormalised by the share of the network's draws inside the support, estimated by "
                "sampling: pass `rng_key`."
            )
        if density not in space.log_prob_fns:
            space.log_prob_fns[density] = jax.jit(density.build(space.score_fn, state.sde), static_argnames="exact")
        log_density = conditional_log_prob(
            rng_key, space.log_prob_fns[density], state.params, transform, tokens, condition_mask,
            exact_trace_max_dim=density.exact_trace_max_dim, num_probes=density.num_probes, batch_size=batch_size,
        )
        if not bounded_latent:
            return log_density
        check_positive_int(support_draws, "support_draws")
        # The normaliser from the flow the density integrates: its solver and tolerances.
        flow = ProbabilityFlowODE(solver=density.solver, num_steps=density.num_steps, rtol=density.rtol,
                                  atol=density.atol, max_steps=density.max_steps, final_denoise=False)
        z = draw_z(jax.random.fold_in(rng_key, SUPPORT_STREAM), space, flow, state.params, z_observed[None],
                   condition_mask[None], support_draws, batched=False, batch_size=batch_size,
                   progress_bar=self.progress_bar, allow_split=False)[:, 0]
        acceptance = float(np.mean(inside_support(np.asarray(z)[:, None], *z_bounds, ~condition_mask[None])))
        if acceptance == 0.0:
            raise RuntimeError(
                f"None of {support_draws} draws of the network lies inside the support of the "
                f"{_bounded_latent(space, condition_mask)}: the restricted density is undefined here. "
                "Use interval_sites='transform' for this model."
            )
        return log_density - np.log(acceptance)


def _bounded_latent(space: QuerySpace, condition_mask) -> str:
    """The latent sites of a query that draws can leave (``interval_sites="reject"``)."""
    bounded = np.isfinite(space.transform.z_bounds()[0]) & ~np.asarray(condition_mask)
    site_index = space.layout.site_of_token()
    names = dict.fromkeys(space.layout.sites[site_index[token]].name for token in np.flatnonzero(bounded))
    return "latent bounded sites " + ", ".join(repr(name) for name in names)
