"""Settings: one validated object, built once at start-up and passed down.

Values come, highest priority first, from keyword arguments, environment
variables prefixed ``REVISIT_`` (nested sections joined by ``__``, e.g.
``REVISIT_POSTGRES__PORT``) and an optional TOML file (``revisit --config
FILE`` or ``REVISIT_CONFIG``). An invalid value stops the program with one line
that names the setting and the problem (:class:`revisit.errors.ConfigError`).
"""

from __future__ import annotations

import contextvars
import tomllib
from datetime import date
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from revisit.errors import ConfigError

ENV_PREFIX = "REVISIT_"
ENV_NESTED_DELIMITER = "__"
DATABASE_URL_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")

# The TOML file of the Settings being built; a context variable rather than a
# global so that two threads can load two configurations.
_toml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "revisit_toml_file", default=None
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresSettings(_Section):
    """The embedded PostgreSQL cluster, used when no ``database_url`` is set."""

    bin_dir: Path | None = Field(
        default=None,
        description="Directory holding initdb, pg_ctl and pg_config; found on its own when unset.",
    )
    os_user: str = Field(
        default="postgres",
        min_length=1,
        pattern=r"^[a-z_][a-z0-9_-]*$",
        description="Unprivileged OS user that owns the cluster when revisit runs as root.",
    )
    port: int = Field(
        default=5432,
        ge=1024,
        le=65535,
        description="Names the Unix socket; the embedded cluster never listens on TCP.",
    )
    start_timeout_s: float = Field(default=60.0, gt=0, le=3600)


class IngestSettings(_Section):
    """What every source shares: the chip grid and what counts as unusable."""

    chip_size: int = Field(default=64, ge=8, le=1024, description="Pixels per chip side at 10 m.")
    min_valid_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="A chip with less valid (non-nodata) area is quarantined as all-nodata.",
    )
    max_cloud_fraction: float = Field(
        default=0.99,
        ge=0,
        le=1,
        description="A chip with more cloud or shadow is quarantined as fully-cloudy.",
    )
    future_tolerance_s: float = Field(
        default=3600,
        ge=0,
        description="An acquisition this far past the present is quarantined as future-date.",
    )
    min_free_mb: float = Field(
        default=256,
        ge=0,
        description="Ingest stops before a scene whose chips would leave less free space than "
        "this on the chip store's filesystem (room for the database and checkpoints).",
    )
    lease_s: float = Field(
        default=120,
        ge=1,
        le=86400,
        description="An ingest worker's lease on its scene; renewed every third of it while "
        "the worker lives, so another worker takes the scene over this long after a crash.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Claims of a scene by ingest workers before it is failed and quarantined "
        "as ingest-failed (a source outage does not count).",
    )
    worker_poll_s: float = Field(
        default=5,
        gt=0,
        le=3600,
        description="How often an idle ingest worker looks for a scene to claim.",
    )


class SimulatedSettings(_Section):
    """The simulated world: the default source, needing no credentials and no network."""

    seed: int = Field(default=0, ge=0, description="The world is a pure function of the seed.")
    start: date = Field(
        default=date(2023, 1, 1), description="First simulated acquisition day (UTC)."
    )
    tile_size_deg: float = Field(
        default=1.0, gt=0, le=10, description="Scene tiles are squares this many degrees wide."
    )


class LocalSettings(_Section):
    """A directory of Sentinel-2 products on disk."""

    path: Path | None = Field(
        default=None, description="SAFE folders, OSCD-style band folders, GeoTIFFs/COGs."
    )


def _http_url(value: str | None) -> str | None:
    """``value`` when it is an http(s) URL with a host (or None); else ValueError."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return value


class _HttpSourceSettings(_Section):
    """What the HTTP sources share: the catalog's cloud filter and the retry policy
    (:class:`revisit.ingest.sources.retry.RetryPolicy`)."""

    max_cloud_cover: float = Field(default=80.0, ge=0, le=100, description="Catalog filter, %.")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Per HTTP request.")
    max_retries: int = Field(
        default=5, ge=0, le=20, description="For 429, 5xx, resets and timeouts."
    )
    backoff_s: float = Field(default=1.0, gt=0, le=60, description="First retry delay; doubles.")
    max_backoff_s: float = Field(default=60.0, gt=0, le=3600)


class SentinelHubSettings(_HttpSourceSettings):
    """Credentials, endpoints and retry policy of the Sentinel Hub source."""

    client_id: str | None = None
    client_secret: SecretStr | None = None
    base_url: str = "https://sh.dataspace.copernicus.eu"
    token_url: str = (
        "https://identity.dataspace.copernicus.eu/auth/realms/CDSE/protocol/openid-connect/token"
    )
    collection: Literal["sentinel-2-l1c", "sentinel-2-l2a"] = "sentinel-2-l2a"

    @field_validator("base_url", "token_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        return str(_http_url(value))


#: The STAC presets (``stac.preset``): API root, collection, URL signing.
STAC_PRESETS: dict[str, tuple[str, str, str]] = {
    "earth-search": ("https://earth-search.aws.element84.com/v1", "sentinel-2-l2a", "none"),
    "earth-search-c1": (
        "https://earth-search.aws.element84.com/v1",
        "sentinel-2-c1-l2a",
        "none",
    ),
    "planetary-computer": (
        "https://planetarycomputer.microsoft.com/api/stac/v1",
        "sentinel-2-l2a",
        "planetary-computer",
    ),
}


class StacSettings(_HttpSourceSettings):
    """A STAC API of Sentinel-2 COGs (``--source stac``): where, what, and how to read it.

    ``preset`` names a public catalog; ``api_url``, ``collection`` and ``signing``
    override what it says, so any STAC API can be used by URL.
    """

    preset: Literal["earth-search", "earth-search-c1", "planetary-computer"] = Field(
        default="earth-search-c1",
        description="A public catalog: its API root, collection and URL signing.",
    )
    api_url: str | None = Field(default=None, description="STAC API root; None: the preset's.")
    collection: str | None = Field(default=None, description="Collection id; None: the preset's.")
    signing: Literal["none", "planetary-computer"] | None = Field(
        default=None, description="How asset URLs are signed; None: the preset's."
    )
    sas_token_url: str = Field(
        default="https://planetarycomputer.microsoft.com/api/sas/v1/token",
        description="Planetary Computer's SAS token endpoint (signing = planetary-computer).",
    )
    page_size: int = Field(default=100, ge=1, le=10_000, description="Items per search page.")
    gdal_cache_mb: int = Field(
        default=128, ge=8, le=65536, description="GDAL's raster block cache (GDAL_CACHEMAX)."
    )
    http_cache_mb: int = Field(
        default=64,
        ge=1,
        le=65536,
        description="GDAL's cache of HTTP ranges read (CPL_VSIL_CURL_CACHE_SIZE).",
    )
    read_threads: int = Field(
        default=16,
        ge=0,
        le=256,
        description="Threads reading a scene's band files, one per file, ahead; 0: none.",
    )

    @field_validator("api_url", "sas_token_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return _http_url(value)

    def resolved(self) -> tuple[str, str, str]:
        """(API root, collection, signing): the preset's, overridden where set."""
        url, collection, signing = STAC_PRESETS[self.preset]
        return (
            self.api_url or url,
            self.collection or collection,
            self.signing or signing,
        )


#: The learner's training methods (``learner.method``); revisit.learner.trainer implements them.
LearnerMethod = Literal["moco", "tp", "geo-tp", "seco", "teco", "caco"]
LEARNER_METHODS: tuple[str, ...] = get_args(LearnerMethod)


class LearnerSettings(_Section):
    """The online learner (DESIGN §4): method, model, tuple mining and the change estimate."""

    method: LearnerMethod = Field(
        default="caco",
        description="Training method; ``caco`` is change-aware contrastive learning.",
    )
    batch_size: int = Field(default=64, ge=2, le=4096, description="Locations per step.")
    queue_size: int = Field(default=16384, ge=1, le=1_000_000, description="Keys per head, K.")
    proj_dim: int = Field(default=128, ge=8, le=2048, description="Projection dimension.")
    momentum: float = Field(default=0.999, ge=0, le=1, description="Key encoder momentum m.")
    temperature: float = Field(default=0.07, gt=0, le=10, description="InfoNCE τ.")
    lr: float = Field(
        default=0.03,
        gt=0,
        le=10,
        description="Learning rate for a batch of 256; scaled linearly with batch_size.",
    )
    optimizer: Literal["sgd", "adamw"] = Field(
        default="sgd",
        description=(
            "sgd: SGD with momentum (MoCo's); adamw: AdamW (MoCo v3's), whose steps move"
            " every layer alike, where SGD's barely move the deep ones in a short run."
        ),
    )
    sgd_momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    short_min_days: float = Field(default=14, ge=0, description="k+ at least this far from q.")
    short_max_days: float = Field(default=120, gt=0, description="k+ at most this far from q.")
    long_min_days: float = Field(default=330, gt=0, description="k_lt at least this long before q.")
    doy_window_days: float = Field(
        default=45, ge=0, le=182, description="k_lt's day of year within this of q's."
    )
    min_valid_fraction: float = Field(
        default=0.8, ge=0, le=1, description="Observations below this valid share are not mined."
    )
    max_cloud_fraction: float = Field(
        default=0.2, ge=0, le=1, description="Observations above this cloud share are not mined."
    )
    recency_half_life_days: float = Field(
        default=180, gt=0, description="Replay weight halves for observations this much older."
    )
    recency_mix: float = Field(
        default=0.5, ge=0, le=1, description="Share of draws weighted by recency; the rest uniform."
    )
    beta: float = Field(default=0.8, ge=0, lt=1, description="EMA weight of the old ratio r.")
    change_distance: Literal["dense", "embedding"] = Field(
        default="dense",
        description=(
            "The distances R is made of: dense (the 90th percentile of cell distances on the"
            " key encoder's standardised input and stem, layer1 and layer2 maps) or embedding"
            " (CACo's: the head-0 projections)."
        ),
    )
    bn_splits: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Batch-norm groups of a step (MoCo's shuffle-BN on one process): the query batch"
            " is normalised in this many groups, and each location's key rows in another"
            " group than its query's; 1: one group each."
        ),
    )
    warmup_steps: int = Field(
        default=200, ge=0, description="Steps before the first mixture fit; long-term keys masked."
    )
    refit_every: int = Field(default=100, ge=1, description="Steps between mixture refits.")
    checkpoint_every: int = Field(
        default=100, ge=1, description="Steps between checkpoints (and change-estimate writes)."
    )
    keep_checkpoints: int = Field(default=3, ge=1, le=1000, description="Checkpoint files kept.")
    refresh_every: int = Field(
        default=50, ge=1, description="Steps between looks for newly ingested observations."
    )
    geo_clusters: int = Field(default=100, ge=2, le=10_000, description="K-means K for geo-tp.")
    prefetch: int = Field(default=3, ge=1, le=64, description="Batches prepared ahead.")
    chip_cache_mb: int = Field(
        default=96, ge=0, le=1_000_000, description="Memory for chips already read; 0: none."
    )
    seed: int = Field(default=0, ge=0, description="Seed of mining, augmentation and weights.")
    threads: int = Field(default=0, ge=0, le=256, description="Torch threads; 0: torch's default.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where the step runs; auto: cuda when available, else cpu.",
    )
    normalization: Literal["data", "none"] = Field(
        default="data",
        description=(
            "Input standardisation of a new model: per-band mean and std estimated from the"
            " chips it first trains on (data), frozen into the checkpoint; none: identity."
        ),
    )
    normalization_chips: int = Field(
        default=512, ge=1, le=100_000, description="Chips the band statistics are estimated on."
    )
    augment: Literal["spectral", "geometric", "band-jitter"] = Field(
        default="spectral",
        description=(
            "Augmentation policy: spectral (crop, flips, global gain, mild blur, noise),"
            " geometric (crop, flips) or band-jitter (per-band brightness and contrast)."
        ),
    )
    crop_size: int = Field(
        default=32,
        ge=0,
        le=1024,
        description=(
            "Side of the training views in pixels (query crops; key images are resized to it);"
            " 0: the chip's own size."
        ),
    )
    crop_scale: tuple[float, float] = Field(
        default=(0.15, 0.6),
        description="Range of a query crop's share of the chip's area.",
    )
    channels_last: bool = Field(
        default=True, description="Run convolutions in channels-last memory format."
    )
    lr_warmup_steps: int = Field(
        default=100, ge=0, description="Steps of linear learning-rate warm-up from 0."
    )
    lr_schedule: Literal["cosine", "constant"] = Field(
        default="cosine",
        description="After the warm-up: cosine decay over lr_horizon_steps, or constant.",
    )
    lr_horizon_steps: int = Field(
        default=5000, ge=1, description="Step at which the cosine decay reaches its floor."
    )
    lr_min_ratio: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Floor of the cosine decay as a share of lr; the rate stays there after.",
    )

    @model_validator(mode="after")
    def _windows(self) -> LearnerSettings:
        if self.short_min_days >= self.short_max_days:
            raise ValueError("short_min_days must be below short_max_days")
        if self.queue_size < self.batch_size:
            raise ValueError("queue_size must be at least batch_size")
        if 0 < self.crop_size < 32:
            raise ValueError("crop_size must be 0 (the chip's size) or at least 32 pixels")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError("crop_scale must satisfy 0 < min <= max <= 1")
        return self


class ExportSettings(_Section):
    """ONNX models and change maps (DESIGN §5)."""

    keep_versions: int = Field(
        default=5, ge=1, le=1000, description="Published ONNX versions kept on disk."
    )
    parity_tolerance: float = Field(
        default=1e-4, gt=0, le=1, description="Largest |ONNX - PyTorch| allowed before publishing."
    )
    parity_chips: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Real chips from the database the parity check runs on.",
    )
    opset: int = Field(default=18, ge=13, le=23, description="ONNX opset of exported models.")
    cog_resolution_deg: float | None = Field(
        default=None,
        gt=0,
        description="Cell size of change-map COGs in degrees; None: the median location spacing.",
    )
    graph_cache: bool = Field(
        default=True,
        description=(
            "Keep each exported graph, without its weights, so that the next export of the"
            " same architecture swaps the new weights in instead of tracing the model again."
        ),
    )
    graph_cache_dir: Path | None = Field(
        default=None,
        description="Where the graphs are kept; None: <data_dir>/cache/onnx-graphs.",
    )
    features_pooling: Literal["levels", "last"] = Field(
        default="levels",
        description=(
            "What the features model pools: the stem's and all four layers' outputs,"
            " concatenated (levels, 1024-d), or layer4's alone (last, 512-d)."
        ),
    )
    dense_model: bool = Field(
        default=True,
        description=(
            "Publish the dense model (the encoder's feature maps, for hypercolumn pair change"
            " maps) beside the features and embedding models."
        ),
    )
    pair_scoring: Literal["hypercolumn", "stem", "dense", "windows"] = Field(
        default="hypercolumn",
        description=(
            "How a pair change map scores pixels: deep change vector analysis on the dense"
            " model's feature maps (hypercolumn), the encoder's stem at every pixel (stem;"
            " 'dense' is its old name), or whole-model embeddings of sliding windows (windows)."
        ),
    )
    pair_keep: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction of each level's channels a hypercolumn pair map keeps.",
    )
    pair_threshold_method: str = Field(
        default="",
        description="How a pair map's change mask is thresholded; '' = the default method.",
    )
    pair_opening_px: int = Field(
        default=0, ge=0, le=50, description="Opening radius (pixels) of a pair map's change mask."
    )
    pair_min_area_m2: float = Field(
        default=0.0, ge=0, description="Minimum mapping unit (m²) of a pair map's change mask."
    )
    pair_stride: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Pixels between windows of a pair change map scored by windows.",
    )
    pair_batch: int = Field(
        default=64, ge=1, le=4096, description="Windows per onnxruntime call in a pair change map."
    )


class AlertSettings(_Section):
    """Change alerts (docs/alerts.md): how the daemon delivers them to webhooks.

    The ``change_alert`` rows and the ``NOTIFY revisit_change`` need no setting.
    Webhooks get alerts only while ``webhook_secret`` is set: every POST is signed
    with it, and without it nothing is sent (the deliveries wait, and age).
    """

    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key that signs every webhook POST; None: nothing is sent.",
    )
    deliver_every_s: float = Field(
        default=5, gt=0, le=3600, description="Seconds between runs of the delivery job."
    )
    timeout_s: float = Field(
        default=10, gt=0, le=300, description="Connect and read timeout of one POST."
    )
    backoff_s: float = Field(
        default=10, gt=0, le=86400, description="A failing webhook's first wait; doubles."
    )
    max_backoff_s: float = Field(
        default=3600, gt=0, le=86400, description="The longest wait between two attempts."
    )
    max_age_s: float = Field(
        default=3 * 86400, gt=0, description="A delivery not made by this age of its alert fails."
    )
    lease_s: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="A claimed delivery is not claimed again for this long (a killed sender's).",
    )
    max_per_run: int = Field(
        default=1000, ge=1, le=1_000_000, description="POSTs one run makes; the next run goes on."
    )

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("webhook_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AlertSettings:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be at least backoff_s")
        if self.lease_s <= self.timeout_s:
            raise ValueError("lease_s must be longer than timeout_s")
        return self


class DaemonSettings(_Section):
    """``revisit run`` (DESIGN §6): the scheduled jobs, the leader lock, health and metrics.

    The defaults let ``make run`` on two CPU cores show ingest, learning and an
    export within the first minutes.
    """

    http_port: int = Field(
        default=8787,
        ge=0,
        le=65535,
        description="Port of /healthz, /readyz and /metrics on 127.0.0.1; 0 picks a free one.",
    )
    sources: tuple[Literal["simulated", "local", "sentinelhub", "stac"], ...] = Field(
        default=("simulated",), description="Sources with an ingest job; empty: no ingest."
    )
    ingest_every_s: float = Field(default=60, gt=0, description="Seconds between ingest runs.")
    ingest_max_scenes: int = Field(
        default=100, ge=1, description="Scenes one ingest run looks at; the next run goes on."
    )
    learn_every_s: float = Field(default=1, gt=0, description="Pause between two learning chunks.")
    learn_chunk_steps: int = Field(
        default=20, ge=1, description="Learner steps per learning chunk."
    )
    learn_chunk_s: float = Field(
        default=10, gt=0, description="A learning chunk also ends after this many seconds."
    )
    learner_processes: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Learner processes: 1 learns in the daemon; N > 1 runs `revisit learn --nproc N`"
            " (torch.distributed, DDP) as a supervised child."
        ),
    )
    ingest_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "Ingest worker processes (`revisit ingest --worker`) the daemon runs; 0: the"
            " ingest jobs ingest in-process."
        ),
    )
    refit_every_s: float = Field(
        default=120, gt=0, description="Seconds between change-mixture refits."
    )
    export_every_steps: int = Field(
        default=100, ge=1, description="Learner steps between ONNX exports."
    )
    export_every_s: float = Field(
        default=600, gt=0, description="Seconds between ONNX exports (of a new checkpoint)."
    )
    changemap_every_s: float = Field(
        default=180, gt=0, description="Seconds between change-map exports of each AOI."
    )
    changemap_formats: tuple[Literal["geojson", "cog", "png"], ...] = Field(
        default=("geojson", "cog", "png"), description="Formats of scheduled change maps."
    )
    keep_changemaps: int = Field(
        default=5, ge=1, le=1000, description="Change maps kept per AOI and format."
    )
    housekeeping_every_s: float = Field(
        default=3600, gt=0, description="Seconds between chip garbage collections."
    )
    chip_gc_min_age_s: float = Field(
        default=3600, ge=0, description="Only unreferenced chip files older than this go."
    )
    misfire_grace_s: float = Field(
        default=300, gt=0, description="A run later than this is skipped to its next time."
    )
    standby_poll_s: float = Field(
        default=1, gt=0, le=60, description="How often a standby tries the leader lock."
    )
    stall_after_s: float = Field(
        default=900, gt=0, description="/readyz fails when learning made no progress this long."
    )
    job_threads: int = Field(
        default=4, ge=2, le=64, description="Threads running jobs (ingest runs on its own)."
    )
    bootstrap_aoi: str | None = Field(
        default="demo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="On a database without locations, add this AOI and a grid in it; None: no.",
    )
    bootstrap_bbox: tuple[float, float, float, float] = Field(
        default=(2.25, 48.80, 2.45, 48.92),
        description="The bootstrap AOI: west, south, east, north.",
    )
    bootstrap_spacing_m: float = Field(
        default=3500, ge=100, description="Spacing of the bootstrap AOI's grid of locations."
    )

    @field_validator("bootstrap_aoi", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", "none", "None") else value

    @field_validator("bootstrap_bbox")
    @classmethod
    def _bbox(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        west, south, east, north = value
        if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
            raise ValueError(
                "must be west,south,east,north in degrees with west < east, south < north"
            )
        return value


class Settings(BaseSettings):
    """Everything revisit can be configured with.

    Attributes:
        data_dir: Where revisit keeps its state: the embedded database
            (``postgres/``), chips, checkpoints and exports. Made absolute
            against the working directory at load time.
        database_url: A PostgreSQL/PostGIS server to use instead of the
            embedded cluster (``postgresql://user:password@host:port/db``).
            Never logged or printed with its password.
        log_level: Threshold of the log.
        log_format: ``json`` (one object per line), ``text``, or ``auto``:
            JSON unless standard error is a terminal.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    data_dir: Path = Path("var")
    database_url: SecretStr | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    postgres: PostgresSettings = PostgresSettings()
    ingest: IngestSettings = IngestSettings()
    simulated: SimulatedSettings = SimulatedSettings()
    local: LocalSettings = LocalSettings()
    sentinelhub: SentinelHubSettings = SentinelHubSettings()
    stac: StacSettings = StacSettings()
    learner: LearnerSettings = LearnerSettings()
    export: ExportSettings = ExportSettings()
    daemon: DaemonSettings = DaemonSettings()
    alerts: AlertSettings = AlertSettings()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in DATABASE_URL_SCHEMES:
            raise ValueError(
                f"must be a PostgreSQL URL ({', '.join(s + '://' for s in DATABASE_URL_SCHEMES)}),"
                f" not {parts.scheme or 'a bare string'}"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _toml_file.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def embedded(self) -> bool:
        """Whether revisit runs its own PostgreSQL cluster (no ``database_url``)."""
        return self.database_url is None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build and validate the Settings.

    Args:
        config_file: An optional TOML file; environment variables override it.
        **overrides: Values that override every other source.

    Returns:
        The validated settings.

    Raises:
        ConfigError: The file is missing or not TOML, or a value is invalid;
            the message is one line naming the setting and the problem.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file}: no such file")
        try:
            with config_file.open("rb") as f:
                tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: not valid TOML: {exc}") from None
    token = _toml_file.set(config_file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, config_file=config_file)) from None
    finally:
        _toml_file.reset(token)


_SECRET_HINTS = ("secret", "password", "database_url", "token")


def describe_validation_error(exc: ValidationError, *, config_file: Path | None = None) -> str:
    """Turn a pydantic ValidationError into one line that names each bad setting.

    Secret values are never echoed.
    """
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"]]
        name = ".".join(loc) or "settings"
        env = ENV_PREFIX + ENV_NESTED_DELIMITER.join(loc).upper()
        message = str(error["msg"])
        if error["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file else ""
            parts.append(f"unknown setting {name}{where}")
            continue
        given = ""
        if error["type"] != "missing" and not any(h in name.lower() for h in _SECRET_HINTS):
            given = f" (got {error['input']!r})"
        parts.append(f"invalid setting {name} ({env}): {message}{given}")
    return "; ".join(parts).replace("\n", " ")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Works on libpq URIs and SQLAlchemy URLs alike; a password given as a
    ``password=`` query parameter is masked too.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if sep else f"{user}@{hostinfo}"
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else (f"{k}={v}" if sep_ else k)
        for k, sep_, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))
