"""Analyses as plug-ins: each analysis is one module (or small package) registered here.

``seglens run``, the report, the CLI, ``results.json`` validation and the YAML config iterate
over ``ordered()``; nothing outside an analysis's own module names it. Add one with
``register_analysis(Analysis(...))`` or the ``seglens.analyses`` entry-point group
(``docs/extending.md``).
"""

from seglens.analyses.registry import (
    ENTRY_POINT_GROUP,
    Analysis,
    Block,
    Command,
    Feed,
    Panel,
    Table,
    analyses,
    by_config_key,
    get,
    ordered,
    register_analysis,
    unregister_analysis,
)

__all__ = ["ENTRY_POINT_GROUP", "Analysis", "Block", "Command", "Feed", "Panel", "Table"]
__all__ += ["analyses", "by_config_key", "get", "ordered", "register_analysis"]
__all__ += ["unregister_analysis"]
