"""Writers and readers of 1-D results: text (``.dat`` / ``.xy``) and NeXus/HDF5.

Text: one file per frame, ``#`` header lines (program, operation and parameters, PONI
geometry, detector, source file and frame, the job config as one JSON line), a ``#`` column
line, then three columns ``radial intensity sigma`` that ``numpy.loadtxt`` reads (empty bins
are ``nan``).

NeXus (design §5), one file for all frames::

    /                     @default="entry"
    /entry                NXentry, @default="data"
        reduction         NXprocess: program, version, date, operation,
                          configuration (NXnote, JSON), poni (NXnote, PONI text)
        data              NXdata, @signal="intensity", @axes=[".", <radial>], @<radial>_indices=1
            intensity            (n_frames, npt) float32
            intensity_errors     (n_frames, npt) float32   sigma (standard error of the mean)
            std                  (n_frames, npt) float32   spread of the pixels in the ring
            count                (n_frames, npt) float32   pixels (fragments) per bin
            sum_signal, sum_variance, sum_normalization, sum_normalization2
                                 (n_frames, npt) float64   accumulators, to re-bin or merge
            <radial>             (npt,) float64, @units, @long_name, @unit_name
            source               (n_frames,) str  input file (``file.h5::/path`` for datasets)
            frame_index          (n_frames,) int64 frame index inside the source

``<radial>`` is the quantity: ``q``, ``2th`` or ``r``; its ``units`` attribute gives the unit
(``nm^-1``, ``A^-1``, ``deg``, ``rad``, ``mm``) and ``unit_name`` azfilter's unit name.

Modules: ``meta`` (what every output records), ``text``, ``nexus`` (the writer), ``read``
(results and stored job configs back), ``merge`` (shard files into one), ``sinks`` (what the
pipeline's writer thread calls).

Every output appears atomically: it is written under a temporary name in the same folder and
renamed when complete.
"""

from .merge import merge_nexus
from .meta import (
    PROGRAM,
    REQUIRED_ROW_ARRAYS,
    ROW_ARRAYS,
    TEXT_CONFIG_PREFIX,
    OutputMeta,
    beam_centre,
    geometry_lines,
    radial_dataset_name,
    to_json,
)
from .nexus import NexusWriter
from .read import (
    ResultTable,
    read_nexus_config,
    read_result,
    read_stored_config,
    read_text_config,
    stored_frames,
)
from .sinks import NexusSink, Sink, TextSink
from .text import (
    format_text,
    source_stem,
    text_header,
    text_output_complete,
    text_output_name,
    text_suffix,
    write_text,
)

__all__ = [
    "PROGRAM", "REQUIRED_ROW_ARRAYS", "ROW_ARRAYS", "TEXT_CONFIG_PREFIX", "NexusSink",
    "NexusWriter", "OutputMeta", "ResultTable", "Sink", "TextSink", "beam_centre",
    "format_text", "geometry_lines", "merge_nexus", "radial_dataset_name", "read_nexus_config",
    "read_result", "read_stored_config", "read_text_config", "source_stem", "stored_frames",
    "text_header", "text_output_complete", "text_output_name", "text_suffix", "to_json",
    "write_text",
]
