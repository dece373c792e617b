"""A Flask application with an app factory, Flask-SQLAlchemy and Flask-Migrate, as `flask db init` expects."""

import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()
migrate = Migrate()


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["SHOP_DATABASE_URI"]
    if os.environ.get("SHOP_AUDIT_DATABASE_URI"):  # a second database, for Flask-Migrate's multidb template
        app.config["SQLALCHEMY_BINDS"] = {"audit": os.environ["SHOP_AUDIT_DATABASE_URI"]}
    db.init_app(app)
    migrate.init_app(app, db)
    from . import models  # noqa: F401  the models Flask-Migrate's autogenerate compares with
    if os.environ.get("SHOP_CONNECT_AT_START"):  # as applications that warm their pool or check the database do
        from sqlalchemy import text

        with app.app_context():
            db.session.execute(text("SELECT 1"))
            db.session.remove()
    if os.environ.get("SHOP_REGISTER_NODE"):  # as privacyIDEA upserts its node's row while it is created
        from sqlalchemy import text

        with app.app_context(), db.engine.begin() as connection:
            connection.execute(text("CREATE TABLE IF NOT EXISTS shop_nodes (name text PRIMARY KEY, seen int)"))
            connection.execute(text("INSERT INTO shop_nodes VALUES ('node-1', 1) "
                                    "ON CONFLICT (name) DO UPDATE SET seen = shop_nodes.seen + 1"))
    if os.environ.get("SHOP_UPGRADE_AT_START"):  # as ihatemoney's factory runs flask_migrate.upgrade() itself
        import flask_migrate

        with app.app_context():
            flask_migrate.upgrade()
    app.logger.info("shop application created")
    return app
