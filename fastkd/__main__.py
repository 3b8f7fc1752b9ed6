"""python -m fastkd: each method, its ops, and the backend each op runs on here."""
import argparse

import torch

from . import backend

# Method -> the ops its loss runs through (Baseline is torch's cross_entropy).
METHODS = {
    "Logits": ["logits"], "SoftTarget": ["soft_target"], "AT": ["at"], "Hint": ["hint"],
    "NST": ["nst"], "PKTCosSim": ["pkt_cos_sim"], "FSP": ["fsp"], "FT": ["ft"],
    "RKD": ["rkd", "rkd_distance", "rkd_angle"], "AB": ["ab"], "SP": ["sp"], "Sobolev": ["sobolev"],
    "BSS": ["bss"], "CC": ["cc"], "LwM": ["lwm"],
    "IRG": ["irg_vertex", "irg_edge", "irg_transformation"], "VID": ["vid"], "OFD": ["ofd"],
    "AFD": ["afd"], "CRD": ["crd_contrast"], "DML": ["dml"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastkd", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"fastkd on {device} (requested backend: {backend.current_backend()})")
    print(f"{'method':<12} {'op':<20} {'runs on':<10} available")
    print(f"{'Baseline':<12} {'cross_entropy':<20} {'torch':<10} torch")
    for method, ops in METHODS.items():
        for op in ops:
            try:
                chosen = backend.resolve(op, device)
            except backend.BackendUnavailableError:
                chosen = "-"
            print(f"{method:<12} {op:<20} {chosen:<10} {', '.join(backend.available(op, device))}")


if __name__ == "__main__":
    main()
