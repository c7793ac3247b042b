"""``stepdistill sample MODEL``: generate a grid (and optionally an .npz) from a model folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="generate images from a teacher folder",
        description="Generate images with a teacher sampler and save a PNG grid (nearest-neighbour upscaled "
                    "when small), optionally an .npz (images uint8 NHWC, labels), and the resolved settings "
                    "as <out> with the suffix .yaml.")
    p.add_argument("model", help="teacher folder (or digits16, the shipped one), run folder or export")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: 50 for a teacher, the trained step count for a student)")
    p.add_argument("--sampler", default="ddim", help="ddim | euler | heun | dpmpp2m (default ddim)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale; 1 = off")
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same images")
    p.add_argument("--out", default="samples.png", help="PNG grid path (default samples.png)")
    p.add_argument("--save-npz", default=None, help="also write the images as .npz (uint8 NHWC + labels)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class ids, cycled over the images so that every grid row shows them in "
                        "order, one column per class (default: every class)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image models: a prompt (repeat the flag for more; cycled over the images)")
    p.add_argument("--prompts", default=None, help="text-to-image models: a prompt list (.txt, .csv or .jsonl)")
    p.add_argument("--resolution", type=int, default=None,
                   help="text-to-image teachers: image size in pixels (default: the pipeline's)")
    p.add_argument("--negative-prompt", default="", help="text-to-image teachers under CFG: the negative prompt")
    p.add_argument("--batch", type=int, default=256, help="images per forward batch (default 256)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: number of classes)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="a run folder: sample the raw student weights instead of their EMA")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled weights (.bin/.pt/.ckpt); they can run code when loaded")
    p.set_defaults(func=run)


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    from ..errors import UserError

    if num_classes == 0:
        if text:
            raise UserError("--classes was given but the model is unconditional; drop --classes")
        return None
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise UserError(f"--classes {text!r} is not a comma-separated list of integers, e.g. --classes 0,1,2") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise UserError(f"--classes {text!r}: class ids must be in 0..{num_classes - 1} (got {bad or 'none'})")
    return classes


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import save_resolved
    from ..data import save_npz
    from ..errors import UserError
    from ..images import image_format, save_grid
    from ..outputs import check_outputs
    from ..loaders import load_for_sampling
    from ..pretrain import class_cycle
    from ..progress import Counter
    from ..sampling import get_sampler

    for name, v in (("--steps", args.steps), ("--num", args.num), ("--batch", args.batch)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    get_sampler(args.sampler)
    image_format(args.out)
    if args.save_npz and not args.save_npz.endswith(".npz"):
        raise UserError(f"--save-npz {args.save_npz!r} must name an .npz file")
    check_outputs(args.model, {"--out": Path(args.out), "--out (its settings file)": Path(args.out).with_suffix(".yaml"),
                               "--save-npz": Path(args.save_npz) if args.save_npz else None})
    model = load_for_sampling(args.model, trust_pickle=args.trust_pickle, resolution=args.resolution, ema=args.ema)
    args.steps = args.steps or model.default_steps
    prompts = None
    if model.is_text_to_image:
        if args.prompts:
            from ..t2i.prompts import read_prompts

            prompts = read_prompts(args.prompts).prompts
        prompts = (prompts or []) + list(args.prompt or [])
        if not prompts:
            raise UserError("this is a text-to-image model; give --prompt \"...\" (repeatable) or --prompts FILE")
        prompts = [prompts[i % len(prompts)] for i in range(args.num)]
    elif args.prompt or args.prompts:
        raise UserError("--prompt/--prompts need a text-to-image model; this one is class-conditional or "
                        "unconditional (use --classes)")
    classes = parse_classes(args.classes, model.num_classes)
    if args.guidance != 1.0 and classes is None and prompts is None:
        raise UserError("--guidance needs a class-conditional model; this one is unconditional (use --guidance 1)")

    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.num, *model.shape), generator=g)  # all noise first: batch size changes nothing
    labels = None if classes is None else class_cycle(args.num, classes)
    out = []
    text = model.text_cond(prompts, negative_prompt=args.negative_prompt) if prompts is not None else None
    with Counter("sampling", args.num, "images") as bar:
        for i in range(0, args.num, args.batch):
            sl = slice(i, i + args.batch)
            cond = {k: v[sl] for k, v in text.items()} if text is not None else model.make_cond(
                None if labels is None else labels[sl])
            out.append(model.generate(noise[sl], cond, args.steps, args.sampler, args.guidance, generator=g))
            bar.advance(len(noise[sl]))
    x = model.to_pixels(torch.cat(out))

    nrow = args.nrow or (len(classes) if classes and len(classes) <= 16 else 8)
    grid = save_grid(x, args.out, nrow)
    settings = {"model": str(args.model), "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
                "num": args.num, "seed": args.seed, "classes": classes, "prompts": prompts, "batch": args.batch, "nrow": nrow,
                "out": str(grid), "npz": args.save_npz}
    if args.save_npz:
        save_npz(args.save_npz, x, labels)
    save_resolved(settings, grid.parent, grid.with_suffix(".yaml").name)
    print(f"wrote {grid}" + (f" and {args.save_npz}" if args.save_npz else ""))
    return 0
