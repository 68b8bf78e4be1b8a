"""The browser front end's commands: `web` (write or serve the static site) and `import-adapter`."""

from __future__ import annotations

from pathlib import Path

import click

from vqt_edge.errors import UserError


@click.command("web")
@click.option(
    "--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle to adapt in the page."
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder to write the static site into.")
@click.option(
    "--serve",
    "serve_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Serve this site on localhost (after writing it, if --out is given too).",
)
@click.option("--port", type=int, default=8026, show_default=True, help="Port on 127.0.0.1 for --serve.")
@click.option(
    "--ort-web",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with onnxruntime-web's dist/ files (default: this checkout's node_modules, `npm ci`).",
)
def web(bundle: Path | None, out: Path | None, serve_dir: Path | None, port: int, ort_web: Path | None) -> None:
    """A static site that adapts BUNDLE in a browser tab: the photos never leave the page.

    \b
    vqt-edge web --bundle BUNDLE --out SITE     write index.html, its JavaScript, onnxruntime-web, the graphs
    vqt-edge web --serve SITE [--port 8026]     serve it on http://127.0.0.1:PORT/
    """
    from vqt_edge.web.serve import make_server
    from vqt_edge.web.site import write_site

    if bundle is None and serve_dir is None:
        raise UserError("give --bundle B --out SITE to write a site, or --serve SITE to serve one")
    if bundle is not None:
        if out is None:
            raise UserError("--bundle needs --out SITE")
        sizes = write_site(bundle, out, ort_web)
        click.echo(f"wrote {out}: {len(sizes)} files, {sum(sizes.values()) / 2**20:.1f} MiB")
        for name in ("bundle/frozen.onnx", "bundle/step.onnx", "ort/ort-wasm-simd-threaded.wasm"):
            click.echo(f"  {name}  {sizes[name] / 2**20:.1f} MiB")
    if serve_dir is not None:
        server = make_server(serve_dir, port)
        click.echo(f"serving {serve_dir} on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


@click.command("import-adapter")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="adapter.safetensors (downloaded from the page).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Its adapter_config.json (default: the one beside --adapter).",
)
@click.option("--run", required=True, type=click.Path(file_okay=False, path_type=Path), help="New run folder.")
def import_adapter(bundle: Path, adapter: Path, config_path: Path | None, run: Path) -> None:
    """Make a finished run folder from an adapter trained in the page (or anywhere else)."""
    from device_runner import ort

    ort.block_torch()
    from vqt_edge.web.imported import import_adapter as make_run

    summary = make_run(bundle, adapter, run, config_path)
    click.echo(f"{run}: model.onnx {summary['files']['model.onnx'][:12]}..., ready for eval and predict")
