"""`psss-ioc run`, `psss-ioc demo` and the legacy `psss_processing` console script."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from psss_ioc import pvs
from psss_ioc.ioc_config import DEFAULT_OUTPUT_PORT, DEFAULT_PREFIX, IocConfig

log = logging.getLogger(__name__)

DEMO_PREFIX = "PSSS-DEMO"


def _explicit(ctx: click.Context) -> set[str]:
    """Parameters given on the command line (they win over the boot script)."""
    return {
        name for name in ctx.params
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    }


# -h as well as --help also when the command runs on its own (`ioc_command` starts it without
# the group): click caches a command's help option, so the README's generated help text must
# not depend on which way the command was first built in a process.
@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_stream", required=False, default="")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Record prefix; records are <prefix>:<NAME>.")
@click.option("--input-mode", type=click.Choice(["PULL", "SUB"], case_sensitive=False),
              default="PULL", show_default=True)
@click.option("--image-channel", default=None,
              help="bsread channel of the image [default: <prefix>:FPICTURE].")
@click.option("--output-port", type=int, default=DEFAULT_OUTPUT_PORT, show_default=True,
              help="Port of the output bsread stream (0: none).")
@click.option("--output-mode", type=click.Choice(["PUSH", "PUB"], case_sensitive=False),
              default="PUSH", show_default=True)
@click.option("--image-output-port", type=int, default=None,
              help="Send the image in its own stream on this port (as psss_processing 1.8).")
@click.option("--no-forward-image", is_flag=True, help="Leave the image out of the output.")
@click.option("--auto-start", is_flag=True, help="Start processing once the IOC is up.")
@click.option("--autosave-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the autosave files (settings survive restarts).")
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
    from psss_ioc import ioc

    config = IocConfig(
        prefix=options["prefix"],
        input_stream=options["input_stream"],
        input_mode=options["input_mode"].upper(),
        image_channel=options["image_channel"],
        output_port=options["output_port"],
        output_mode=options["output_mode"].upper(),
        image_port=options["image_output_port"],
        forward_image=not options["no_forward_image"],
        auto_start=options["auto_start"],
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


# ------------------------------------------------------------------------------ demo
def free_port(pair: bool = False) -> int:
    """A free loopback port; with `pair`, p and p+1 both free for TCP and UDP (CA needs the
    server port and the repeater port next to it)."""
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        if port > 65000:
            continue
        try:
            for p in (port, port + 1):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as t:
                        t.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair on loopback")


def ioc_command(input_stream: str, prefix: str, *options: str) -> list[str]:
    """The command line that runs the IOC in a subprocess (used by demo and benchmarks)."""
    return [sys.executable, "-c", "from psss_ioc.commands import run_command; run_command()",
            input_stream, "--prefix", prefix, *options]


def loopback_epics_env(ca_port: int = 5064, pva_port: int = 5075) -> dict[str, str]:
    """EPICS variables that keep an IOC and its clients on the loopback interface."""
    return {
        "EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_SERVER_PORT": str(ca_port), "EPICS_CA_REPEATER_PORT": str(ca_port + 1),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_SERVER_PORT": str(ca_port),
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1", "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO", "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_SERVER_PORT": str(pva_port), "EPICS_PVA_BROADCAST_PORT": str(pva_port + 1),
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_SERVER_PORT": str(pva_port),
        "EPICS_PVAS_BROADCAST_PORT": str(pva_port + 1),
        "EPICS_CA_MAX_ARRAY_BYTES": "40000000",
    }


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, wait, kill on timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@click.command("demo")
@click.option("--prefix", default=DEMO_PREFIX, show_default=True)
@click.option("--rate", type=float, default=10.0, show_default=True, help="Simulated frames/s.")
@click.option("--height", type=int, default=2016, show_default=True)
@click.option("--width", type=int, default=2560, show_default=True)
@click.option("--ca-port", type=int, default=5064, show_default=True)
@click.option("--pva-port", type=int, default=5075, show_default=True)
@click.option("--rest-port", type=int, default=12000, show_default=True,
              help="Port of the IOC's legacy REST API on 127.0.0.1 (0: off).")
@click.option("--duration", type=float, default=0.0, help="Stop after this many seconds.")
def demo_command(prefix: str, rate: float, height: int, width: int, ca_port: int,
                 pva_port: int, rest_port: int, duration: float) -> None:
    """Simulated camera + IOC on this machine, processing; prints the PVs and a live line."""
    import epics  # the demo's own process is a plain CA client of the IOC subprocess

    env = {**os.environ, **loopback_epics_env(ca_port, pva_port)}
    os.environ.update(loopback_epics_env(ca_port, pva_port))
    from psss_ioc.simulate import SimulatorProcess

    output_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="psss-demo-"))
    background = workdir / "background.h5"
    camera = SimulatorProcess(["--rate", str(rate), "--height", str(height), "--width",
                               str(width), "--prefix", prefix, "--energy-axis", "9000", "9100",
                               "--write-background", str(background)])
    camera_address = camera.address
    ioc_proc: subprocess.Popen[Any] | None = None
    try:
        ioc_proc = subprocess.Popen(
            ioc_command(camera_address, prefix, "--output-port", str(output_port),
                        "--auto-start", "--autosave-dir", str(workdir / "autosave"),
                        "--background-path", str(workdir),
                        *(["--rest-port", str(rest_port)] if rest_port else ["--no-rest"])),
            env=env, stdin=subprocess.DEVNULL)
        names = {pv.name: pvs.full_name(prefix, pv) for pv in pvs.TABLE}
        center = epics.PV(names[pvs.SPECTRUM_CENTER.name])
        if not center.wait_for_connection(timeout=30):
            raise click.ClickException("the IOC did not come up within 30 s")
        if background.exists():
            epics.caput(names[pvs.BACKGROUND_FILE.name], str(background), wait=True)
        epics.caput(names[pvs.SPECTRUM_X.name], np.linspace(9000.0, 9100.0, width), wait=True)
        click.echo(f"IOC {prefix} (CA port {ca_port}, PVA port {pva_port}) processing "
                   f"{camera_address}; output stream tcp://127.0.0.1:{output_port}"
                   + (f"; REST http://127.0.0.1:{rest_port}/" if rest_port else ""))
        click.echo("PVs: " + " ".join(names[pv.name] for pv in pvs.TABLE))
        click.echo(f"Try:  EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO "
                   f"caget {names[pvs.SPECTRUM_FWHM.name]}")
        click.echo(f"      pvget {pvs.full_name(prefix, pvs.PVA_GROUP)}")
        deadline = time.monotonic() + duration if duration > 0 else None
        watch = [pvs.STATUS, pvs.RATE, pvs.PULSE_ID, pvs.SPECTRUM_CENTER, pvs.SPECTRUM_FWHM,
                 pvs.FIT_STATUS, pvs.N_LOST]
        while deadline is None or time.monotonic() < deadline:
            if ioc_proc.poll() is not None or camera.proc.poll() is not None:
                raise click.ClickException("the IOC or the simulated camera exited")
            v = {pv.name: epics.caget(names[pv.name], as_string=pv.kind == pvs.Kind.MBB_IN,
                                      timeout=2) for pv in watch}
            click.echo(
                f"\r{v['STATUS']:<20} rate {v['RATE'] or 0:6.1f} Hz  "
                f"pulse {int(v['PULSE_ID'] or 0)}  "
                f"centre {v['SPECTRUM_CENTER'] or float('nan'):9.2f} eV  "
                f"FWHM {v['SPECTRUM_FWHM'] or float('nan'):7.2f} eV  fit {v['FIT_STATUS']}  "
                f"lost {int(v['N_LOST'] or 0)}   ", nl=False)
            time.sleep(1.0)
        click.echo()
    except KeyboardInterrupt:
        click.echo()
    finally:
        if ioc_proc is not None:
            stop_process(ioc_proc)
        camera.stop()


# ------------------------------------------------------------------------------ legacy CLI
@click.command("psss_processing", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_stream")
@click.option("-i", "--prefix", default=DEFAULT_PREFIX, show_default=True)
@click.option("-o", "--data_output_stream_port", type=int, default=DEFAULT_OUTPUT_PORT,
              show_default=True)
@click.option("--image_output_stream_port", type=int, default=None)
@click.option("-r", "--rest_api_port", type=int, default=12000, show_default=True)
@click.option("--rest_api_interface", default="0.0.0.0", show_default=True)
@click.option("--log_level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                                case_sensitive=False))
@click.option("--auto_start", is_flag=True)
@click.option("--ymin_pv", default=None, help="External PV of the ROI first row.")
@click.option("--ymax_pv", default=None, help="External PV of the ROI end row.")
@click.option("--axis_pv", default=None, help="External PV of the energy axis.")
@click.option("--autosave_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def legacy_main(input_stream: str, prefix: str, data_output_stream_port: int,
                image_output_stream_port: int | None, rest_api_port: int,
                rest_api_interface: str, log_level: str, auto_start: bool,
                ymin_pv: str | None, ymax_pv: str | None, axis_pv: str | None,
                autosave_dir: Path | None) -> None:
    """psss_processing INPUT_STREAM: the legacy command line, served by the new IOC."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from psss_ioc import ioc

    if (ymin_pv is None) != (ymax_pv is None):
        raise click.UsageError("--ymin_pv and --ymax_pv go together")
    config = IocConfig(
        prefix=prefix,
        input_stream=input_stream,
        output_port=data_output_stream_port,
        image_port=image_output_stream_port,
        auto_start=auto_start,
        autosave_dir=autosave_dir,
        roi_pvs=(ymin_pv, ymax_pv) if ymin_pv and ymax_pv else None,
        axis_pv=axis_pv,
    )
    config.rest = (rest_api_interface, rest_api_port)  # ioc.run serves it
    ioc.run(config)
