"""Flower App: FedAvg over three hospitals of UCI Heart Disease (deployment mode)."""
