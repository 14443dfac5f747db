"""Seeds and per-seed generators; running a click command as a main()."""
import re

import torch


def parse_int_list(text):
    """'0-63' or '1,5,10-19' -> list of ints (ranges inclusive). Raises ValueError with the expected form."""
    if isinstance(text, (list, tuple)):
        return list(text)
    result = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r} runs backwards; write it as {hi}-{lo}")
            result.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            result.append(int(part))
        else:
            raise ValueError(f"malformed seeds {text!r}: use non-negative integers and ranges, e.g. '0-63' or "
                             "'1,5,10-19'")
    return result


def seed_generators(seeds, device):
    """One generator per seed, seeded with the seed mod 2^32: a seed's draws do not depend on its batch."""
    return [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def randn_per_seed(generators, shape, dtype, device):
    """Stack one draw of `shape` from each generator: [len(generators), *shape]. Drawn in float64 and cast, so
    a seed's noise is the same (up to the cast) whatever dtype is sampled in."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float64)
                        for g in generators]).to(dtype)


def run_command_line(command, argv, prog):
    """Run a click command as a module's main(): a bad option or value is one line '<prog>: error: ...' and exit 1."""
    import click
    try:
        command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        raise SystemExit(1)
    except ValueError as e:
        print(f'{prog}: error: {e}')
        raise SystemExit(1)
