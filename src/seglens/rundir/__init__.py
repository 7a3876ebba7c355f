"""The run directory: its files (``files``), the schema of ``results.json`` (``schema``) and
``RunDir`` (``run``), through which every analysis reads its inputs and adds its section."""

from seglens.rundir.run import CHECKPOINT, CONFIG, RESULTS, RUN_OUTPUTS, RunDir, put_section
from seglens.rundir.schema import SCHEMA_VERSION, clean_condition, load_results

__all__ = ["CHECKPOINT", "CONFIG", "RESULTS", "RUN_OUTPUTS", "SCHEMA_VERSION", "RunDir"]
__all__ += ["clean_condition", "load_results", "put_section"]
