# One image for every service of docker-compose.yml: workers, the beat scaler, Flower.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY loader ./loader
COPY tasks ./tasks
COPY scaler ./scaler
COPY monitoring ./monitoring
COPY api ./api
COPY workers.py celeryconfig.py flowerconfig.py demo_autoscaling.py ./
# PyPI's torch wheel for Linux is the CUDA build: GPU workers need nothing more.
RUN pip install --no-cache-dir .
RUN useradd --create-home inference
USER inference
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO"]
