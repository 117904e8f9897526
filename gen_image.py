"""Generate one image with the chosen optimization stack.

    python gen_image.py --ckpt tiny --prompt "a red cat" --output-file cat.png
    python gen_image.py --ckpt black-forest-labs/FLUX.1-dev --prompt "An astronaut next to a giant lemon"
    torchrun --nproc-per-node 2 gen_image.py --ckpt black-forest-labs/FLUX.1-dev --context_parallel ulysses
"""

import json

import torch
from PIL.PngImagePlugin import PngInfo

from utils import parallel
from utils.benchmark_utils import create_parser, pipeline_call_kwargs, resolved_defaults, set_rand_seeds, stack_flags
from utils.pipeline_utils import StackError, load_pipeline, optimize, validate_args


def generate(pipeline, args):
    kwargs = pipeline_call_kwargs(args)
    if "Kontext" in type(pipeline).__name__:
        from diffusers.utils import load_image

        kwargs["image"] = load_image(args.image)
    return pipeline(**kwargs, generator=torch.manual_seed(args.seed)).images[0]


def main(argv=None):
    parser = create_parser()
    args = resolved_defaults(parser.parse_args(argv))
    try:
        validate_args(args)
    except StackError as e:
        parser.error(str(e))
    if "kontext" in args.ckpt.lower() and not args.image:
        parser.error("FLUX.1-Kontext-dev edits an image: pass --image PATH_OR_URL")
    set_rand_seeds(args.seed)
    pipeline = optimize(load_pipeline(args), args)
    image = generate(pipeline, args)  # under torchrun on every rank; rank 0 saves it
    if not parallel.is_main():
        parallel.shutdown()
        return image
    meta = PngInfo()
    for key in ("prompt", "seed", "num_inference_steps", "height", "width", "guidance_scale", "ckpt"):
        meta.add_text(key, str(getattr(args, key)))
    meta.add_text("stack_flags", json.dumps(stack_flags(args)))
    meta.add_text("stack", json.dumps(pipeline.harness_stack))
    image.save(args.output_file, pnginfo=meta)
    print(f"Image saved to {args.output_file}")
    parallel.shutdown()
    return image


if __name__ == "__main__":
    main()
