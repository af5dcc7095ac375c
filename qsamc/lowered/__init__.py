"""What lowering produces, below the passes that build it and the export that emits it: the static subnet
(`static`: one searched subnet as a plain, fixed module) and the integer layers the lowering passes put in
it (`layers`: integer weights, symmetric activation quantizers, each writing its own ONNX Q/DQ)."""
