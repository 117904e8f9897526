"""Generate one image with the chosen optimization stack.

    python gen_image.py --ckpt tiny --prompt "a red cat" --output-file cat.png
    python gen_image.py --ckpt black-forest-labs/FLUX.1-dev --prompt "An astronaut next to a giant lemon"
    python gen_image.py --ckpt black-forest-labs/FLUX.1-Kontext-dev --image cat.png --prompt "Make the cat blue"
    python gen_image.py --ckpt tiny:qwen-image --prompt "a red cat" --output-file cat.png
    torchrun --nproc-per-node 2 gen_image.py --ckpt black-forest-labs/FLUX.1-dev --context_parallel ulysses
"""

import json
import os
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from utils.benchmark_utils import (check_args, create_parser, pipeline_call_kwargs, resolved_defaults, set_rand_seeds,
                                   stack_flags)


def generate(pipeline, args):
    # FLUX.1-Kontext's input image (--image) is among the call's arguments (pipeline_call_kwargs)
    return pipeline(**pipeline_call_kwargs(args), generator=torch.manual_seed(args.seed)).images[0]


def check_output_file(path: str) -> None:
    """Refuse, before any work, an output file that could not be saved (ValueError)."""
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"--output-file {path}: a folder; give a file name, e.g. {output / 'image.png'}")
    if not output.parent.is_dir():
        raise ValueError(f"--output-file {path}: the folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"--output-file {path}: the folder {output.parent} is not writable")
    if output.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--output-file {path}: unknown image format {output.suffix!r}; use .png")


def main(argv=None):
    parser = create_parser()
    args = resolved_defaults(parser.parse_args(argv))
    try:  # what the flags alone can tell, before diffusers and the stack are imported
        check_args(args)
        check_output_file(args.output_file)
    except ValueError as e:
        parser.error(str(e))

    from utils import parallel
    from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args

    try:
        validate_args(args)
    except StackError as e:
        parser.error(str(e))
    set_rand_seeds(args.seed)
    pipeline = optimize(load_pipeline(args), args)
    image = generate(pipeline, args)  # under torchrun on every rank; rank 0 saves it
    if not parallel.is_main():
        parallel.shutdown()
        return image
    meta = PngInfo()
    for key in ("prompt", "seed", "num_inference_steps", "height", "width", "guidance_scale", "ckpt", "image"):
        meta.add_text(key, str(getattr(args, key)))
    meta.add_text("stack_flags", json.dumps(stack_flags(args)))
    meta.add_text("stack", json.dumps(pipeline.harness_stack))
    image.save(args.output_file, pnginfo=meta)
    print(f"Image saved to {args.output_file}")
    parallel.shutdown()
    return image


if __name__ == "__main__":
    main()
