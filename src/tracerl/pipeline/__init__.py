"""Pipeline plumbing shared by stages and flows: artifact folders, manifests, runners."""
