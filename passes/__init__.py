"""IR passes, one per file. Each honours `qsamc.ir.pass_manager.Pass`: `pass_(ir) -> PassResult`."""

from qsamc.passes.annotate_precision import AnnotatePrecisionPass
from qsamc.passes.annotate_structure import AnnotateStructurePass
from qsamc.passes.attach_lora import AttachLoraPass
from qsamc.passes.calibrate_activations import CalibrateActivationsPass
from qsamc.passes.count_bitops import BitopsModel, BitopsReport, CountBitopsPass, node_macs
from qsamc.passes.extract_subnet import ExtractSubnetPass
from qsamc.passes.fold_offset_into_norm import FoldOffsetIntoNormPass
from qsamc.passes.fold_weight_quantizers import FoldWeightQuantizersPass
from qsamc.passes.fuse_attention import FuseFloatAttentionPass
from qsamc.passes.insert_quantizers import InsertQuantizersPass
from qsamc.passes.lower_activation_offsets import LowerActivationOffsetsPass
from qsamc.passes.lower_attention import LowerAttentionQuantizersPass
from qsamc.passes.quantize_bias import QuantizeBiasPass

__all__ = [
    "AnnotatePrecisionPass",
    "AnnotateStructurePass",
    "AttachLoraPass",
    "BitopsModel",
    "BitopsReport",
    "CalibrateActivationsPass",
    "CountBitopsPass",
    "ExtractSubnetPass",
    "FoldOffsetIntoNormPass",
    "FoldWeightQuantizersPass",
    "FuseFloatAttentionPass",
    "InsertQuantizersPass",
    "LowerActivationOffsetsPass",
    "LowerAttentionQuantizersPass",
    "QuantizeBiasPass",
    "node_macs",
]
