"""Writers and readers of 1-D results: text (``.dat`` / ``.xy``) and NeXus/HDF5.

Text: one file per frame, ``#`` header lines (program, operation and parameters, PONI
geometry, detector, source file and frame, the job config as one JSON line), a ``#`` column
line, then three columns ``radial intensity sigma`` that ``numpy.loadtxt`` reads (empty bins
are ``nan``).

NeXus (README "Outputs"), one file for all frames, conforming to the NXazint1d application
definition (NeXus definitions v2026.01) plus azfilter's own records::

    /                     NXroot @default="entry"
    /entry                NXentry @default="data"
        definition = "NXazint1d", title, program_name, start_time, end_time
        solid_angle_applied, polarization_applied, normalization_applied, monitor_applied
        instrument        NXinstrument: name; monochromator (NXmonochromator: wavelength
                          in angstrom, energy in keV); source (NXsource: name, type, probe)
        reduction         NXprocess: program, version, date, reference, note, operation,
                          [shard "I/N"], input (NXparameters: every reduction parameter,
                          wavelength, PONI text), configuration (NXnote, job JSON),
                          poni (NXnote, PONI text)
        data              NXdata @signal="I" @axes=[".", "radial_axis"]
                          @interpretation="spectrum"
            I                    (n_frames, npt) float32   @long_name="intensity"
            I_errors             (n_frames, npt) float32   sigma (standard error of the mean)
            std                  (n_frames, npt) float32   spread of the pixels in the ring
            count                (n_frames, npt) float32   pixels (fragments) per bin
            sum_signal, sum_variance, sum_normalization, sum_normalization2
                                 (n_frames, npt) float64   accumulators, to re-bin or merge
            radial_axis          (npt,) float64 @long_name ("q", "2theta", "r"),
                                 @units ("1/nm", "1/angstrom", "degree", "rad", "mm"),
                                 @unit_name (azfilter's unit name)
            source               (n_frames,) str  input file (``file.h5::/path`` for datasets)
            frame_index          (n_frames,) int64 frame index inside the source
        azfilter          NXcollection @complete (every planned frame a row or failed)
            manifest      @digest @shards @entries; source, frame_index: the planned frames
            failed        source, frame_index (-1: the whole source), reason
            missing       @shards; source, frame_index (only when not complete)

Files of the layout before NXazint1d (``intensity``, ``intensity_errors``, an axis named
``q``/``2th``/``r``) are still read and merged.

Modules: ``meta`` (what every output records), ``text``, ``nexus`` (the writer), ``read``
(results and stored job configs back), ``merge`` (shard files into one), ``sinks`` (what the
pipeline's writer thread calls).

Every output appears atomically: it is written under a temporary name in the same folder and
renamed when complete.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> submodule that defines it. Imported on first use (PEP 562), so that a job
# writing text files never imports the NeXus writer, reader and merger (and a job writing
# HDF5 never imports the text writer).
_EXPORTS = {
    "merge_nexus": "merge",
    **dict.fromkeys(["PROGRAM", "REQUIRED_ROW_ARRAYS", "ROW_ARRAYS", "TEXT_CONFIG_PREFIX",
                     "OutputMeta", "beam_centre", "geometry_lines", "nexus_axis_attributes",
                     "radial_dataset_name", "to_json"], "meta"),
    **dict.fromkeys(["NexusWriter", "OutputWriteError"], "nexus"),
    **dict.fromkeys(["ResultTable", "check_nexus", "read_nexus_config", "read_result",
                     "read_stored_config", "read_text_config", "stored_frames"], "read"),
    **dict.fromkeys(["NexusSink", "Sink", "TextSink"], "sinks"),
    **dict.fromkeys(["format_text", "sector_paths", "source_stem", "text_header",
                     "text_output_complete", "text_output_name", "text_suffix", "write_text"],
                    "text"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
