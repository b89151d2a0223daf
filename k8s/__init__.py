"""Kubernetes manifests (kustomize: base/, overlays/, components/) and their tooling."""
