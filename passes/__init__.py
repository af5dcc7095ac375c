"""IR passes, one per file. Each honours `qsamc.pass_manager.Pass`: `pass_(ir) -> PassResult`."""

from qsamc.passes.annotate_precision import AnnotatePrecisionPass
from qsamc.passes.annotate_structure import AnnotateStructurePass
from qsamc.passes.attach_lora import AttachLoraPass
from qsamc.passes.calibrate_activations import CalibrateActivationsPass
from qsamc.passes.count_bitops import BitopsModel, BitopsReport, CountBitopsPass, node_macs
from qsamc.passes.insert_quantizers import InsertQuantizersPass

__all__ = [
    "AnnotatePrecisionPass",
    "AnnotateStructurePass",
    "AttachLoraPass",
    "BitopsModel",
    "BitopsReport",
    "CalibrateActivationsPass",
    "CountBitopsPass",
    "InsertQuantizersPass",
    "node_macs",
]
