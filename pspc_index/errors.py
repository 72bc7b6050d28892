"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (file, argument, data). The message says what and where."""


def check_device(device) -> None:
    """The one check before any CUDA use: a device string torch cannot read, one other than cpu or cuda, or
    cuda on a machine (or a torch build) without CUDA is refused with one line (UserError), not torch's
    RuntimeError or AssertionError."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device (cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available (no GPU, or torch built without CUDA); "
                        "use --device cpu")
