"""units_kmeans: the k-means model of the units stage when it is trained here
(``units.n_clusters=K``): one job, settings in the ``units`` section (see ``stages/units.py``)."""
from stages.units import KMEANS_STAGE as STAGE  # noqa: F401

Config = None  # no section of its own: units.* and the kmeans.* backend settings
