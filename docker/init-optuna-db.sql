-- A second database on the same server for the Optuna studies.
CREATE DATABASE optuna OWNER mate;
