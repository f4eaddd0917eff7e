"""The lab: everything above the minimal VAE. It measures (analysis.py, gmm.py, codes.py), draws
(figures.py, explorer.py), runs experiments and manages runs (command.py, training.py, runs.py,
options.py, console.py, resources.py, report.py, speed.py, models.py). It imports the core
(vae.py, autograd.py, mnist.py, train.py) and the variations beside it (priors.py,
likelihoods.py); none of them imports the lab. Run it as python -m lab.
"""
