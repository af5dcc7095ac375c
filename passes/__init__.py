"""IR passes, one per file. Each honours `qsamc.pass_manager.Pass`: `pass_(ir) -> PassResult`."""

from qsamc.passes.annotate_precision import AnnotatePrecisionPass
from qsamc.passes.annotate_structure import AnnotateStructurePass
from qsamc.passes.count_bitops import BitopsModel, BitopsReport, CountBitopsPass, node_macs

__all__ = [
    "AnnotatePrecisionPass",
    "AnnotateStructurePass",
    "BitopsModel",
    "BitopsReport",
    "CountBitopsPass",
    "node_macs",
]
