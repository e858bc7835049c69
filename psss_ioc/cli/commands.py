"""`psss-ioc run` and the legacy `psss_processing` console script (`psss-ioc demo`: demo.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from psss_ioc.ioc.config import (
    DEFAULT_IMAGE_PORT,
    DEFAULT_MAX_IMAGE_MB,
    DEFAULT_OUTPUT_PORT,
    DEFAULT_PREFIX,
    DOCUMENT_NAMES,
    OUTPUT_NAMES,
    V18_NAMES,
    IocConfig,
    prefix_problem,
)

log = logging.getLogger(__name__)


def _checked_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A prefix the IOC can serve records under, else a usage error saying why."""
    if problem := prefix_problem(value):
        raise click.BadParameter(problem)
    return value


def _explicit(ctx: click.Context) -> set[str]:
    """Parameters given on the command line (they win over the boot script)."""
    return {
        name for name in ctx.params
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    }


# -h as well as --help also when the command runs on its own (`processes.ioc_command` starts it
# without the group): click caches a command's help option, so the README's generated help text
# must not depend on which way the command was first built in a process.
@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_stream", required=False, default="")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, callback=_checked_prefix,
              help="Record prefix; records are <prefix>:<NAME>.")
@click.option("--input-mode", type=click.Choice(["PULL", "SUB"], case_sensitive=False),
              default="PULL", show_default=True)
@click.option("--image-channel", default=None,
              help="bsread channel of the image [default: <prefix>:FPICTURE].")
@click.option("--output-port", type=int, default=DEFAULT_OUTPUT_PORT, show_default=True,
              help="Port of the output bsread stream (0: none).")
@click.option("--output-mode", type=click.Choice(["PUSH", "PUB"], case_sensitive=False),
              default="PUSH", show_default=True)
@click.option("--output-names", type=click.Choice(OUTPUT_NAMES), default=DOCUMENT_NAMES,
              show_default=True,
              help=f"Output channel names: '{V18_NAMES}' as psss_processing 1.8.0 sent them "
                   "(<prefix>:SPECTRUM_Y, SPECTRUM_X, SPECTRUM_CENTER, SPECTRUM_FWHM, "
                   "processing_parameters; the image in its own stream, port "
                   f"{DEFAULT_IMAGE_PORT} unless --image-output-port), '{DOCUMENT_NAMES}' as "
                   "its README names them (<image channel>.spectrum, .center, ...).")
@click.option("--image-output-port", type=int, default=None,
              help="Send the image in its own stream on this port (as psss_processing 1.8).")
@click.option("--no-forward-image", is_flag=True, help="Leave the image out of the output.")
@click.option("--max-image-mb", type=click.FloatRange(min=0.001), default=DEFAULT_MAX_IMAGE_MB,
              show_default=True,
              help="Refuse camera images larger than this, decoded, before decompressing them.")
@click.option("--auto-start", is_flag=True, help="Start processing once the IOC is up.")
@click.option("--autosave-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the autosave files [default: $STATE_DIRECTORY, else "
                   "$XDG_STATE_HOME/psss-ioc/<prefix>, else ~/.local/state/psss-ioc/<prefix>].")
@click.option("--no-autosave", is_flag=True,
              help="Save no settings (they are lost at a restart).")
@click.option("--autosave-period", type=float, default=10.0, show_default=True,
              help="Seconds between autosave checks.")
@click.option("--acf", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Access security file.")
@click.option("--st-cmd", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="IOC boot script run through iocsh before iocInit.")
@click.option("--roi-pvs", nargs=2, default=None, metavar="YMIN_PV YMAX_PV",
              help="Follow external ROI PVs into SPC_ROI_YMIN/SPC_ROI_YMAX.")
@click.option("--axis-pv", default=None, help="Follow an external energy axis PV.")
@click.option("--no-pva", is_flag=True, help="Serve Channel Access only.")
@click.option("--rest-host", default="127.0.0.1", show_default=True,
              help="Interface of the legacy REST API (0.0.0.0: the network).")
@click.option("--rest-port", type=int, default=12000, show_default=True,
              help="Port of the legacy REST API (0: off).")
@click.option("--no-rest", is_flag=True, help="No legacy REST API.")
@click.option("--rest-token", envvar="PSSS_REST_TOKEN", default=None,
              help="REST write requests need 'Authorization: Bearer TOKEN' [env PSSS_REST_TOKEN].")
@click.option("--background-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where REST background uploads go [default: <autosave-dir>/backgrounds].")
@click.option("--background-path", "background_paths", multiple=True,
              envvar="PSSS_BACKGROUND_PATH",
              type=click.Path(file_okay=False, path_type=Path),
              help="A directory BACKGROUND_FILE may name files in (repeatable; env "
                   "PSSS_BACKGROUND_PATH, ':'-separated). Files elsewhere, also through '..' or "
                   "symlinks, are refused [default: the --background-dir only].")
@click.pass_context
def run_command(ctx: click.Context, **options: Any) -> None:
    """Run the IOC: records under PREFIX, processing INPUT_STREAM (tcp://host:port).

    Exits cleanly on SIGTERM/SIGINT. Example (the production boot script):

        psss-ioc run --st-cmd iocBoot/iocpsss/st.cmd
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from psss_ioc.ioc import app as ioc

    config = IocConfig(
        prefix=options["prefix"],
        input_stream=options["input_stream"],
        input_mode=options["input_mode"].upper(),
        image_channel=options["image_channel"],
        output_port=options["output_port"],
        output_mode=options["output_mode"].upper(),
        image_port=options["image_output_port"],
        output_names=options["output_names"],
        forward_image=not options["no_forward_image"],
        max_image_mb=options["max_image_mb"],
        auto_start=options["auto_start"],
        autosave=not options["no_autosave"],
        autosave_dir=options["autosave_dir"],
        autosave_period=options["autosave_period"],
        acf=options["acf"],
        st_cmd=options["st_cmd"],
        roi_pvs=tuple(options["roi_pvs"]) if options["roi_pvs"] else None,
        axis_pv=options["axis_pv"],
        enable_pva=not options["no_pva"],
        rest=(None if options["no_rest"] or not options["rest_port"]
              else (options["rest_host"], options["rest_port"])),
        rest_token=options["rest_token"],
        background_dir=options["background_dir"],
        background_paths=tuple(options["background_paths"]),
    )
    ioc.run(config, explicit=_explicit(ctx))


# ------------------------------------------------------------------------------ legacy CLI
@click.command("psss_processing", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_stream")
@click.option("-i", "--prefix", default=DEFAULT_PREFIX, show_default=True,
              callback=_checked_prefix)
@click.option("--image_channel", "--image-channel", "image_channel", default=None,
              help="bsread channel of the image [default: <prefix>:FPICTURE].")
@click.option("-o", "--data_output_stream_port", type=int, default=DEFAULT_OUTPUT_PORT,
              show_default=True)
@click.option("--image_output_stream_port", type=int, default=None,
              help=f"Port of the image's own stream [default: {DEFAULT_IMAGE_PORT}; "
                   f"{DOCUMENT_NAMES} names: none, the image goes with the results].")
@click.option("--output_names", "--output-names", "output_names", type=click.Choice(OUTPUT_NAMES),
              default=V18_NAMES, show_default=True,
              help=f"Output channel names: '{V18_NAMES}' as psss_processing 1.8.0 sent them, "
                   f"'{DOCUMENT_NAMES}' as its README names them (see psss-ioc run --help).")
@click.option("-r", "--rest_api_port", type=int, default=12000, show_default=True)
@click.option("--rest_api_interface", default="0.0.0.0", show_default=True)
@click.option("--log_level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                                case_sensitive=False))
@click.option("--auto_start", is_flag=True)
@click.option("--ymin_pv", default=None, help="External PV of the ROI first row.")
@click.option("--ymax_pv", default=None, help="External PV of the ROI end row.")
@click.option("--axis_pv", default=None, help="External PV of the energy axis.")
@click.option("--autosave_dir", "--autosave-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Directory of the autosave files [default: as psss-ioc run].")
@click.option("--no_autosave", "--no-autosave", is_flag=True,
              help="Save no settings (they are lost at a restart).")
def legacy_main(input_stream: str, prefix: str, image_channel: str | None,
                data_output_stream_port: int,
                image_output_stream_port: int | None, output_names: str, rest_api_port: int,
                rest_api_interface: str, log_level: str, auto_start: bool,
                ymin_pv: str | None, ymax_pv: str | None, axis_pv: str | None,
                autosave_dir: Path | None, no_autosave: bool) -> None:
    """psss_processing INPUT_STREAM: the legacy command line, served by the new IOC."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from psss_ioc.ioc import app as ioc

    if (ymin_pv is None) != (ymax_pv is None):
        raise click.UsageError("--ymin_pv and --ymax_pv go together")
    config = IocConfig(
        prefix=prefix,
        input_stream=input_stream,
        image_channel=image_channel,
        output_port=data_output_stream_port,
        image_port=image_output_stream_port,
        output_names=output_names,
        auto_start=auto_start,
        autosave=not no_autosave,
        autosave_dir=autosave_dir,
        roi_pvs=(ymin_pv, ymax_pv) if ymin_pv and ymax_pv else None,
        axis_pv=axis_pv,
    )
    config.rest = (rest_api_interface, rest_api_port)  # ioc.run serves it
    ioc.run(config)
