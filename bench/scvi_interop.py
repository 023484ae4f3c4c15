"""Helpers of bench/scvi_interop.sh: models moved between tessera and scvi-tools, and what each
computes with the other's.

  tessera-train STORE DIR EPOCHS   trains tessera.model.SCVI (scvi-tools' defaults, ZINB), saves it
                                   with save_scvi_tools into DIR/tessera_model and its latent means
                                   and decoded proportions into DIR/tessera.npz (tessera's venv)
  scvi-train STORE DIR EPOCHS      the same with scvi.model.SCVI: DIR/scvi_model, DIR/scvi.npz
  scvi-read STORE DIR              scvi.model.SCVI.load(DIR/tessera_model): DIR/scvi_reads_tessera.npz
  tessera-read STORE DIR           tessera.model.SCVI.load(DIR/scvi_model): DIR/tessera_reads_scvi.npz
  report DIR                       prints both directions' largest differences
"""

import sys

import anndata as ad
import numpy as np


def adata_of(store):
    adata = ad.read_zarr(store)
    adata.obs["batch"] = adata.obs["batch"].astype("category")
    return adata


def scvi_outputs(model, adata):
    """scvi-tools' latent means and the decoder's proportions at them (scvi-tools'
    get_normalized_expression decodes a posterior draw; the mean is what tessera decodes)."""
    import torch

    module = model.module.eval()
    loader = model._make_data_loader(adata=adata, batch_size=1024, shuffle=False)
    latent, scale = [], []
    with torch.no_grad():
        for tensors in loader:
            z = module.inference(**module._get_inference_input(tensors))["qz"].loc
            px = module.generative(z, torch.zeros(z.shape[0], 1), tensors["batch"])["px"]
            latent.append(z.numpy())
            scale.append(px.scale.numpy())
    return {"latent": np.concatenate(latent), "scale": np.concatenate(scale)}


def tessera_outputs(model):
    return {"latent": model.get_latent_representation(),
            "scale": model.get_normalized_expression(library_size=1.0, return_numpy=True)}


def main(command, *args):
    if command == "tessera-train":
        import tessera
        store, out, epochs = args
        adata = adata_of(store)
        tessera.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
        model = tessera.model.SCVI(adata, gene_likelihood="zinb")
        model.train(max_epochs=int(epochs), progress_bar=False)
        model.save_scvi_tools(f"{out}/tessera_model", overwrite=True)
        np.savez(f"{out}/tessera.npz", **tessera_outputs(model))
    elif command == "scvi-train":
        import scvi
        store, out, epochs = args
        adata = adata_of(store)
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
        model = scvi.model.SCVI(adata)
        model.train(max_epochs=int(epochs), accelerator="cpu", enable_progress_bar=False)
        model.save(f"{out}/scvi_model", overwrite=True)
        np.savez(f"{out}/scvi.npz", **scvi_outputs(model, adata))
    elif command == "scvi-read":
        import scvi
        store, out = args
        adata = adata_of(store)
        model = scvi.model.SCVI.load(f"{out}/tessera_model", adata)
        np.savez(f"{out}/scvi_reads_tessera.npz", **scvi_outputs(model, adata))
    elif command == "tessera-read":
        import tessera
        store, out = args
        model = tessera.model.SCVI.load(f"{out}/scvi_model", adata_of(store))
        np.savez(f"{out}/tessera_reads_scvi.npz", **tessera_outputs(model))
    elif command == "report":
        (out,) = args
        print(f"{'':44}{'cells':>8}{'latent max |Δ|':>16}{'proportions max rel Δ':>24}")
        for what, trained, read in (("tessera's model in scvi-tools", "tessera", "scvi_reads_tessera"),
                                    ("scvi-tools' model in tessera", "scvi", "tessera_reads_scvi")):
            a, b = np.load(f"{out}/{trained}.npz"), np.load(f"{out}/{read}.npz")
            latent = np.abs(a["latent"] - b["latent"]).max()
            rel = (np.abs(a["scale"] - b["scale"]) / np.maximum(a["scale"], 1e-12)).max()
            print(f"{what:44}{len(a['latent']):>8}{latent:>16.2e}{rel:>24.2e}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(*sys.argv[1:])
