from . import db


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(200), nullable=False, unique=True)
    name = db.Column(db.String(100))


class Order(db.Model):
    __tablename__ = "orders"
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("users.id"), nullable=False, index=True)
    total_cents = db.Column(db.BigInteger, nullable=False, server_default="0")
    placed_at = db.Column(db.DateTime(timezone=True), server_default=db.func.now())
    note = db.Column(db.Text)


class Payment(db.Model):
    __tablename__ = "payments"
    id = db.Column(db.Integer, primary_key=True)
    order_id = db.Column(db.Integer, db.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False)
    status = db.Column(db.Enum("pending", "settled", "refunded", name="payment_status"), nullable=False,
                       server_default="pending")
    __table_args__ = (db.UniqueConstraint("order_id", "status"),)
